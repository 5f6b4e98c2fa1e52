"""The command line's parser: one subcommand per job kind, every flag with its help and its
default (docs/cli.md lists them; tests/test_docs.py checks the list against this parser)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Callable, Optional

from .._version import __version__
from ..core.args import int_flag
from ..core.backend import BACKENDS
from ..core.colltable import OPS
from ..core.dtypes import SUPPORTED
from ..core.launch import Parser
from ..layers.activations import ACTIVATIONS
from ..layers.data_parallel import BUCKET_BYTES
from ..layers.mlp import MODES
from ..studies.problem import TRANSFORMER
from ..studies.schemes import KNOWN
from ..studies.sweep import SWEEPS, parse_size

DESCRIPTION = ("Tensor-parallel matrix products over MPI: run, benchmark, model and report. "
               "Run under mpiexec -n P or srun (plan and report need no MPI job). "
               "Reference: docs/cli.md.")
# the command-line flag of each scheme option (tpmpi.studies.sweep.SCHEME_OPTIONS)


_positive = int_flag(1, "a positive integer (digits only, e.g. 1024)")
_non_negative = int_flag(0, "an integer >= 0 (digits only, e.g. 1024)")


# flags that several subcommands take, declared once
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--threads": dict(type=_positive, default=None, metavar="T",
                      help="BLAS threads per rank (default: cores / ranks sharing them; env "
                           "TPMPI_THREADS)"),
    "--bucket-bytes": dict(type=_positive, default=BUCKET_BYTES, metavar="B",
                           help="data parallelism: gradient bucket size in bytes (default: "
                                "25 MiB)"),
}


def _size(text: str) -> int:
    """An argparse type for sizes with K/M/G suffixes (:func:`tpmpi.studies.sweep.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listed(conv: Callable[[str], Any], choices: Optional[Sequence[str]] = None
            ) -> Callable[[str], list]:
    """An argparse type for ``a,b,c`` whose items ``conv`` converts (and ``choices`` limits)."""
    def parse(text: str) -> list:
        items = [conv(v) for v in text.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma list" + (f" of {', '.join(choices)}" if choices
                                                      else ""))
        return items
    return parse


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The transformer schemes' shape: heads, kv heads, sequence length, vocabulary, layers."""
    p.add_argument("--heads", type=_positive, default=None, metavar="H",
                   help="attention/block/gpt: query heads (default: --k / 64)")
    p.add_argument("--kv-heads", type=_positive, default=None, metavar="HKV",
                   help="attention/block/gpt: key/value heads, a divisor of --heads (default: "
                        "--heads)")
    p.add_argument("--seq", type=_positive, default=256, metavar="T",
                   help="attention/block/gpt: tokens per sequence; --m (the tokens) must be a "
                        "multiple (batch = m / seq)")
    p.add_argument("--vocab", type=_positive, default=4096, metavar="V",
                   help="gpt: vocabulary size")
    p.add_argument("--layers", type=_positive, default=2, metavar="L",
                   help="gpt: transformer blocks")


def _add_problem_flags(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The problem flags of ``run``; with ``many`` (``bench``), each takes a comma list."""
    def typed(conv: Callable[[str], Any], default: Any,
              choices: Optional[Sequence[str]] = None, metavar: Optional[str] = None
              ) -> dict[str, Any]:
        if many:  # a comma list; the metavar shows the choices argparse cannot check
            item = "{" + ",".join(choices) + "}" if choices else metavar
            return {"type": _listed(conv, choices), "metavar": item and f"{item}[,...]",
                    "default": None if default is None else [default]}
        return {"type": conv, "default": default, "choices": choices, "metavar": metavar}
    p.add_argument("--scheme", help="parallel scheme" + ("s ('all': every available one)"
                                                         if many else ""),
                   **typed(str, "column", KNOWN + ("all",) if many else KNOWN))
    p.add_argument("--m", help="rows of X (tokens)", **typed(_non_negative, 1024, None, "M"))
    p.add_argument("--k", help="in features (transformer: width d)",
                   **typed(_non_negative, 1024, None, "K"))
    p.add_argument("--n", help="out features", **typed(_non_negative, 1024, None, "N"))
    p.add_argument("--hidden", help="MLP hidden size d_hidden (default: 4 times --k, e.g. "
                   "4096 for --k 1024)", **typed(_non_negative, None, None, "H"))
    _add_model_flags(p)
    p.add_argument("--grid", help="process grid RxC" + (
                   "; 'auto' = 1xP, the squarest grid for tile2d" if many else
                   " (default: 1xP)"), **typed(str, "auto" if many else None, None, "RxC"))
    p.add_argument("--dtype", help="element type",
                   **typed(str, "float32", SUPPORTED))
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="array library: auto = cupy when a CUDA device is usable (env "
                        "TPMPI_BACKEND overrides), else numpy")
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="untimed steps before timing")
    p.add_argument("--iters", type=_positive, default=10,
                   help="timed steps; times are the median (min-max) over them")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--panel", help="tile2d: K-panel width of the double-buffered broadcast "
                   "loop" + (" (0 = gather form)" if many else "") + " (default: the gather "
                   "form, no panel loop)", **typed(_non_negative if many else _positive, None,
                                                   None, "KB"))
    p.add_argument("--chunks", help="column: pipeline the output gather with the GEMM in this "
                   "many row chunks" + (" (0 = unset)" if many else "") + " (default: 1, no "
                   "pipelining)", **typed(_non_negative if many else _positive, None, None,
                                          "C"))
    p.add_argument("--mode", help="mlp: megatron (1 Allreduce each way), book (Allgather after "
                   "each GEMM), sequence (sequence parallelism: activations split by rows) or "
                   "tile2d (SUMMA FFN on --grid) (default: megatron)", **typed(str, None, MODES))
    p.add_argument("--dp", help="data-parallel replicas D: a mesh of D x (the --grid TP grid of "
                   "P/D ranks), each replica taking M/D rows, gradients averaged in backward" +
                   (" (comma list)" if many else "") + " (default: 1)",
                   **typed(_positive, 1, None, "D"))
    p.add_argument("--sequence-parallel", action="store_true",
                   help="mlp: Megatron sequence parallelism (= --mode sequence); "
                        "attention/block/gpt: activations split by token rows (Korthikanti "
                        "et al. 2022)")
    p.add_argument("--bucket-bytes", **SHARED_FLAGS["--bucket-bytes"])
    p.add_argument("--activation", help="mlp activation (default: gelu, the tanh approximation)",
                   **typed(str, None, tuple(ACTIVATIONS)))
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="backward collectives blocking after the dW GEMM (default: overlapped)")
    p.add_argument("--measure-overlap", action="store_true",
                   help="also time forward/backward as is, GEMMs only and collectives only: "
                        "record field 'overlap' (OSU overlap %%, seconds saved)")
    p.add_argument("--threads", **SHARED_FLAGS["--threads"])
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="cost-model calibration for predicted_s (default: env "
                        "TPMPI_CALIBRATION, else the model's defaults)")


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    _add_problem_flags(p, many=True)
    p.add_argument("--sweep", choices=SWEEPS, default="strong",
                   help="strong: fixed problem over P; weak: --dim scaled by P; sizes: -b/-e/-f")
    p.add_argument("-b", "--begin", type=_size, default=None, metavar="SIZE",
                   help="first size of --dim (or bytes with --collective); K/M/G suffixes "
                        "(default: no size sweep)")
    p.add_argument("-e", "--end", type=_size, default=None, metavar="SIZE",
                   help="last size (with -b) (default: no size sweep)")
    p.add_argument("-f", "--factor", type=float, default=2.0, help="size multiplication factor")
    p.add_argument("--dim", choices=("m", "k", "n", "hidden"), default="m",
                   help="the dimension -b/-e/-f sweep and weak scaling grows")
    p.add_argument("--ranks", type=_listed(_positive), default=None, metavar="P[,...]",
                   help="communicator sizes, run on the first P ranks of the job (default: "
                        "1,2,4,...,P for strong/weak, P for sizes)")
    p.add_argument("--collective", type=_listed(str, OPS), default=None,
                   metavar="{" + ",".join(OPS) + "}[,...]",
                   help="collective-only mode: time these collectives over -b/-e/-f bytes "
                        "(default: off, time the schemes)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the serial single-process baseline (speedup, efficiency)")
    p.add_argument("--json", metavar="FILE",
                   help="append one JSON line per configuration (default: no file)")


def make_parser() -> argparse.ArgumentParser:
    """The ``python -m tpmpi`` parser: one subcommand per job kind (docs/cli.md)."""
    parser = Parser(prog="python -m tpmpi", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tpmpi {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_run, _add_bench, _add_calibrate, _add_plan, _add_report):
        add(sub)
    sub.add_parser("info", help="MPI library, backend, GPU-awareness, BLAS threads")
    return parser


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    """``run``: the problem flags, --check, --json, --baseline."""
    run = sub.add_parser("run", help="one timed, verified run; prints a table",
                         description="Time one scheme on all the job's ranks, verify it "
                                     "against a serial float64 reference, print a table.")
    _add_problem_flags(run)
    run.add_argument("--check", action="store_true",
                     help="exit 1 if the relative error exceeds the dtype's tolerance")
    run.add_argument("--json", metavar="FILE",
                     help="append the JSON-lines record to FILE (default: no file)")
    run.add_argument("--baseline", action="store_true",
                     help="also time one process using all the node's BLAS threads (speedup)")


def _add_bench(sub: argparse._SubParsersAction[Parser]) -> None:
    """``bench``: sweeps and the collective benchmark."""
    _add_bench_flags(sub.add_parser(
        "bench", help="scaling sweeps and collective benchmarks",
        description="Sweeps: every combination of the problem flags (each takes a comma list), "
                    "sizes -b/-e/-f of --dim, and --ranks; one JSON line per configuration. "
                    "With --collective: nccl-tests-style collective benchmark."))


def _add_calibrate(sub: argparse._SubParsersAction[Parser]) -> None:
    """``calibrate``: message sizes, dtypes, backend and threads to fit."""
    cal = sub.add_parser("calibrate", help="fit the cost model's alpha/beta/gamma",
                         description="Time the collectives over message sizes and "
                                     "communicator sizes 2, 4, ..., P and local GEMMs; write "
                                     "the fitted alpha/beta per collective and P and the GEMM "
                                     "rates. Run with the ranks and threads you will use.")
    cal.add_argument("--json", metavar="FILE", required=True, help="calibration file to write")
    cal.add_argument("--dtype", type=_listed(str, SUPPORTED), default=None,
                     metavar="{" + ",".join(SUPPORTED) + "}[,...]",
                     help="dtypes whose GEMM rates are measured (default float32,float64; on "
                          "a GPU every supported dtype)")
    cal.add_argument("-b", "--begin", type=_size, default="64", metavar="SIZE",
                     help="smallest message in bytes (K/M/G suffixes)")
    cal.add_argument("-e", "--end", type=_size, default="4M", metavar="SIZE",
                     help="largest message in bytes (K/M/G suffixes)")
    cal.add_argument("-f", "--factor", type=float, default=4.0,
                     help="message size multiplication factor")
    cal.add_argument("--iters", type=_positive, default=10,
                     help="calls timed per message size")
    cal.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="array library whose GEMM rates and buffers are measured")
    cal.add_argument("--threads", **SHARED_FLAGS["--threads"])


def _add_plan(sub: argparse._SubParsersAction[Parser]) -> None:
    """``plan``: one product's sizes, the ranks, dtype and calibration; or, with --cluster, a
    GPT training step on a cluster preset."""
    plan = sub.add_parser("plan", help="layouts ranked by predicted time (no MPI job needed)",
                          description="Rank the layouts of one product (or, with --hidden, "
                                      "the FFN modes) on every dp x tp mesh of P ranks by the "
                                      "cost model's predicted time, and say why the first "
                                      "wins. With --cluster: predict a GPT training step on a "
                                      "cluster preset, term by term, and rank tp x dp "
                                      "configurations.")
    plan.add_argument("--scheme", choices=TRANSFORMER, default=None,
                      help="rank the dp x tp meshes (with and without sequence parallelism) "
                           "of a transformer's attention, block or whole GPT instead "
                           "(default: single-GEMM or FFN layouts; not with --cluster)")
    for dim, what in (("m", "rows of X (tokens)"), ("k", "in features (transformer: d)"),
                      ("n", "out features (not with --scheme)")):
        plan.add_argument(f"--{dim}", type=_positive, default=None,
                          help=f"{what} (no default: required without --cluster)")
    _add_model_flags(plan)
    plan.add_argument("--hidden", type=_positive, default=None,
                      help="rank FFN layouts (mlp modes) with this hidden size instead of "
                           "single-GEMM layouts (default: single-GEMM layouts)")
    plan.add_argument("--ranks", type=_positive, default=None,
                      help="number of ranks P, every dp x tp factorisation ranked (no "
                           "default: required without --cluster)")
    plan.add_argument("--bucket-bytes", **SHARED_FLAGS["--bucket-bytes"])
    plan.add_argument("--dtype", choices=SUPPORTED, default=None,
                      help="element type (default: float32; with --cluster bfloat16 on a GPU "
                           "preset, float32 on a calibration file)")
    plan.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                      help="whose GEMM rates to use")
    plan.add_argument("--backward", action="store_true", help="predict forward + backward")
    plan.add_argument("--no-overlap", dest="overlap", action="store_false",
                      help="backward collectives blocking after the dW GEMM (default: "
                           "overlapped)")
    plan.add_argument("--calibration", metavar="FILE", default=None,
                      help="a calibrate file (default: env TPMPI_CALIBRATION, else the "
                           "model's defaults)")
    gpt = plan.add_argument_group("a GPT training step on a cluster (--cluster)")
    gpt.add_argument("--cluster", metavar="NAME", default=None,
                     help="a preset (dgx-2h, dgx-a100, dgx-a100-40gb, dgx-h100), a preset "
                          ".json file of your own or a calibrate file (a CPU cluster); default: "
                          "plan one product's layouts")
    gpt.add_argument("--model", metavar="SPEC", default=None,
                     help="layers=L,hidden=H,heads=A,seq=S,vocab=V[,kv_heads=K][,dropout=0|1]"
                          "[,bias=0|1] (no default: required with --cluster)")
    gpt.add_argument("--micro-batch", type=_positive, default=None, metavar="b",
                     help="sequences per micro-batch (no default: required with --cluster)")
    gpt.add_argument("--global-batch", type=_positive, default=None, metavar="B",
                     help="sequences per iteration (no default: required with --cluster)")
    gpt.add_argument("--tp", default=None, metavar="T",
                     help="tensor-parallel sizes: 8, 1,2,4,8 or 1-8 (no default: required "
                          "with --cluster)")
    gpt.add_argument("--dp", default=None, metavar="D",
                     help="data-parallel sizes: 16, 1,2,4 or 1-128 (no default: required "
                          "with --cluster)")
    gpt.add_argument("--gpus", type=_positive, default=None,
                     help="rank only the tp x dp that make this many GPUs (default: all)")
    gpt.add_argument("--sequence-parallel", action="store_true",
                     help="sequence parallelism (Korthikanti et al. 2022)")
    gpt.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                     help="activation recomputation")
    gpt.add_argument("--ddp", choices=("overlap", "blocking", "megatron-local"),
                     default="overlap",
                     help="how the DP gradient all-reduce runs: buckets overlapped with "
                          "backward, the same after backward, or Megatron-LM's local DDP")
    gpt.add_argument("--optimizer", choices=("adam", "apex-fp16"), default="adam",
                     help="optimizer step modelled")
    gpt.add_argument("--top", type=_positive, default=20,
                     help="rows of the ranking printed")
    gpt.add_argument("--json", metavar="FILE", default=None,
                     help="write one JSON object per line and configuration, in ranking order "
                          "(default: no file)")


def _add_report(sub: argparse._SubParsersAction[Parser]) -> None:
    """``report``: the record files and the output directory."""
    report = sub.add_parser("report", help="PNG plots, report.md and report.csv from JSON-lines "
                                           "records")
    report.add_argument("files", nargs="+", metavar="FILE.jsonl",
                        help="records written by run/bench --json")
    report.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the PNGs, report.md and report.csv")
