"""Time one TransformerBlock and one GPT training step (forward + backward) on the ranks of
COMM_WORLD as one TP group, with :func:`tpmpi.studies.timing.time_calls`, and write the median
and best seconds with the load they ran under (JSON, rank 0), and the same of the CPU time the
ranks spent (``time.process_time``, the slowest rank's: what a step takes with a core to itself
on a machine that other jobs share, MPI's polling included); with ``--calibration FILE`` also
what the CPU preset of that ``calibrate`` file predicts for both, term by term. The
measurements the CPU preset is checked against (docs/planning.md, "The GPT block and step
against this machine"). Run with one BLAS thread per rank: ``TPMPI_THREADS=1 mpiexec -n 2
python scripts/time_gpt_step.py --layers 2 --hidden 256 --heads 8 --seq 128 --batch 4
--calibration cal.json --json out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from tpmpi.core import launch
from tpmpi.core.backend import get_backend
from tpmpi.core.grid import ProcessGrid
from tpmpi.core.launch import Parser, parse_args
from tpmpi.core.threads import configure_blas_threads
from tpmpi.layers.block import DropoutCall, TransformerBlock
from tpmpi.models import GPT, GPTConfig
from tpmpi.studies.gptshape import GPTShape
from tpmpi.studies.machine import Placement, calibrated_cluster, machine_for
from tpmpi.studies.pricing import price
from tpmpi.studies.timing import time_calls
from tpmpi.studies.trainstep import StepConfig, predict_step


def predictions(a: argparse.Namespace, tp: int) -> dict:
    """What the CPU preset of calibration ``a.calibration`` predicts for the block and the GPT
    step of ``a``'s shape on ``tp`` ranks of one node (seconds; the block's terms)."""
    target = calibrated_cluster(a.calibration, ranks_per_node=tp)
    machine = machine_for(target, Placement(tp, 1, tp))
    block = price(TransformerBlock.schedule_for(a.batch, a.seq, a.hidden, a.heads, tp,
                                                dtype="float32", backward=True), machine)
    shape = GPTShape(a.layers, a.hidden, a.heads, a.seq, a.vocab, dropout=False)
    step = predict_step(target, shape, StepConfig(tp, 1, a.batch, a.batch, dtype="float32"))
    return {"oversubscription": getattr(machine, "oversubscription", 1.0),
            "block_pred_s": block.time_s, "block_products_s": block.product_s,
            "block_pointwise_s": block.compute_s - block.product_s,
            "block_collectives_s": block.comm_s, "gpt_pred_s": step.micro_batch_s}


def main(argv: Optional[Sequence[str]] = None, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Time the block and the GPT on ``comm`` as one TP group; the record (on every rank, the
    file written by rank 0). Collective."""
    p = Parser(prog="time_gpt_step.py", description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 2), ("hidden", 256), ("heads", 8), ("seq", 128),
                          ("batch", 4), ("vocab", 4096), ("iters", 7), ("warmup", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--json", required=True, help="file to append one JSON record to")
    p.add_argument("--calibration", help="a calibrate file: add its CPU preset's predictions")
    a = parse_args(p, argv, comm)
    configure_blas_threads(comm)
    cfg = GPTConfig(a.vocab, a.seq, a.layers, a.heads, a.hidden, dropout=0.0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, a.vocab, (a.batch, a.seq))
    x = rng.standard_normal((a.batch * a.seq, a.hidden)).astype(np.float32)
    with ProcessGrid(comm) as grid:
        model = GPT(cfg, grid=grid, dtype="float32", backend="numpy")
        block = TransformerBlock(a.hidden, a.heads, None, layer=0, grid=grid,
                                 backend=get_backend("numpy"), dtype="float32")
        drop = DropoutCall(0.0, 0, 0, a.seq, 0, (0, a.batch * a.seq), a.hidden)

        def gpt_step() -> Any:
            model.forward(idx, idx)
            model.backward()

        def block_step() -> Any:
            y = block.forward(x.copy(), a.batch, drop)
            return block.backward(np.ones_like(y))

        load = os.getloadavg()[0]
        times = time_calls([block_step, gpt_step], comm, iters=a.iters, warmup=a.warmup)
        cpu = time_calls([block_step, gpt_step], comm, iters=a.iters, clock=time.process_time)
        load_after = os.getloadavg()[0]
    rec = {"tp": comm.Get_size(), **vars(a), "load": [load, load_after], "cpus": os.cpu_count()}
    for row, cpu_row, what in zip(times, cpu, ("block", "gpt")):
        rec[f"{what}_median_s"], rec[f"{what}_best_s"] = float(np.median(row)), float(row.min())
        rec[f"{what}_cpu_median_s"] = float(np.median(cpu_row))
        rec[f"{what}_cpu_best_s"] = float(cpu_row.min())
    if a.calibration:
        rec.update(predictions(a, comm.Get_size()))
    if comm.Get_rank() == 0:
        with open(a.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec))
    return rec


def cli() -> None:
    """The script's entry: :func:`main` on COMM_WORLD (its record goes to the file)."""
    main()


if __name__ == "__main__":
    launch.run(cli, "time_gpt_step.py")
