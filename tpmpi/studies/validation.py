"""The training-step model against published measurements (docs/planning.md shows the table).

``published/megatron.json`` (package data) holds the measurements of Megatron-LM training
GPT-2-style models -- the README of September 2020 (iteration times on DGX A100 and DGX-2) and
Shoeybi et al. 2019 (weak-scaling efficiency on DGX-2H) -- with the configuration they ran
(float16 with float32 master weights, full recomputation, Megatron's optimizer and DDP; each
choice with its source in the file). :func:`validate` predicts every run from the cluster
presets alone: nothing in the model is fitted to these numbers.

A weak-scaling efficiency is the per-GPU FLOP/s of the run over that of its baseline (the 1.2B
model on one GPU), FLOPs by :func:`tpmpi.studies.trainstep.model_flops` for both; a baseline
compared with itself (100 % by definition) is shown but not scored.

:func:`against_runs` does the same for a CPU cluster preset (a ``calibrate`` file,
:func:`tpmpi.studies.machine.calibrated_cluster`) and the runs of ``python -m tpmpi run
--json``: each run's layer schedule priced on the preset's machine next to its measured median.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Optional

from ..layers.data_parallel import BUCKET_BYTES
from .cluster import load_cluster
from .costmodel import layout_label, schedule_of
from .gptshape import GPTShape
from .machine import Placement, Target, machine_for
from .pricing import price
from .problem import RecordedRun
from .trainstep import StepConfig, StepPrediction, predict_step

DATA = "megatron.json"


def load_published() -> dict:
    """The published measurements and their configuration (see the module docstring)."""
    text = resources.files(__package__).joinpath("published").joinpath(DATA).read_text()
    data: dict = json.loads(text)
    return data


@dataclasses.dataclass
class Check:
    """One published run: its ``source``, ``table``, ``label``, the ``measured`` and
    ``predicted`` value of ``metric``, and the prediction behind it."""

    source: str
    table: str
    label: str
    metric: str
    measured: float
    predicted: float
    prediction: StepPrediction
    scored: bool = True

    @property
    def error(self) -> float:
        """Relative error of the prediction (negative: predicted too low)."""
        return self.predicted / self.measured - 1.0


def _predict(run: Mapping[str, Any], data: Mapping[str, Any]) -> StepPrediction:
    conf = data["configuration"]
    shape = GPTShape(seq=conf["seq"], vocab=conf["vocab"], dropout=conf["dropout"],
                     bias=conf["bias"], **data["models"][run["model"]])
    config = StepConfig(tp=run["tp"], dp=run["dp"], micro_batch=run["micro_batch"],
                        global_batch=run["global_batch"], recompute=conf["recompute"],
                        dtype=conf["dtype"], overlap=conf["overlap"],
                        ddp=run.get("ddp", "overlap"), optimizer=conf["optimizer"])
    pred = predict_step(load_cluster(run["cluster"]), shape, config)
    if pred.refused:
        raise ValueError(f"published run {run['model']} tp={run['tp']} dp={run['dp']}: "
                         f"{pred.refused}")
    return pred


def validate(data: Optional[Mapping[str, Any]] = None) -> list[Check]:
    """Every published run next to its prediction."""
    data = data or load_published()
    checks = []
    for run in data["runs"]:
        pred = _predict(run, data)
        label = f"{run['model']} tp={run['tp']}" + (f" dp={run['dp']}" if run["dp"] > 1 else "")
        if run["metric"] == "iteration_ms":
            value, scored = pred.iteration_s * 1e3, True
        else:
            base = _predict(run["baseline"], data)
            value = 100.0 * pred.tflops_per_gpu / base.tflops_per_gpu
            scored = {k: run[k] for k in run["baseline"]} != dict(run["baseline"])
        checks.append(Check(run["source"], run["table"], label, run["metric"],
                            float(run["measured"]), value, pred, scored))
    return checks


def summary(checks: Sequence[Check]) -> tuple[float, float]:
    """``(mean, max)`` absolute relative error over the scored checks."""
    errors = [abs(c.error) for c in checks if c.scored]
    return sum(errors) / len(errors), max(errors)


def _terms(pred: StepPrediction) -> str:
    """The iteration's terms in ms: blocks, embedding and loss, exposed DP, optimizer."""
    n, micro = pred.shape.n_layer, pred.micro_batches
    blocks = micro * n * (pred.layer_fwd_s + pred.layer_recompute_s + pred.layer_bwd_s)
    return (f"{blocks * 1e3:.0f} + {micro * pred.embedding_loss_s * 1e3:.0f} + "
            f"{pred.dp_exposed_s * 1e3:.0f} + {pred.optimizer_s * 1e3:.0f}")


def markdown(checks: Sequence[Check]) -> str:
    """The validation table of docs/planning.md: one row per published run."""
    lines = ["| source | table | run | measured | predicted | error | terms (ms) |",
             "|---|---|---|---:|---:|---:|---|"]
    for c in checks:
        unit = " ms" if c.metric == "iteration_ms" else " %"
        error = f"{c.error:+.1%}" if c.scored else "(baseline)"
        lines.append(f"| {c.source} | {c.table} | {c.label} | {c.measured:.0f}{unit} | "
                     f"{c.predicted:.0f}{unit} | {error} | {_terms(c.prediction)} |")
    mean, worst = summary(checks)
    lines.append("")
    lines.append(f"Mean absolute error {mean:.1%}, largest {worst:.1%} "
                 f"({sum(c.scored for c in checks)} scored points).")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RunCheck:
    """One measured run (``label``: scheme, grid, sizes, pass) next to the preset's
    prediction, in seconds."""

    label: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


def against_runs(target: Target, records: Sequence[Mapping[str, Any]]) -> list[RunCheck]:
    """Each ``run`` record (scheme, sizes, grid, mesh, dtype, pass, options, ``time_s``) next to
    its layer's schedule (:func:`tpmpi.studies.costmodel.schedule_of`) priced on ``target``'s
    machine for the run's placement."""
    checks = []
    for r in records:
        run = RecordedRun.of(r)
        problem, grid, dp = run.problem, run.grid, run.dp
        sched = schedule_of(problem, grid, dp=dp, bucket_bytes=run.bucket_bytes or BUCKET_BYTES)
        if sched is None:
            continue
        machine = machine_for(target, Placement(grid[0] * grid[1], dp, target.gpus_per_node))
        predicted = price(sched, machine, backward=problem.backward).time_s
        label = layout_label(problem.scheme, grid, dp, problem.opts) + \
            f" {problem.m}x{problem.k}x{problem.n}" + \
            (f" hidden={problem.hidden}" if problem.hidden else "") + \
            (" fwd+bwd" if problem.backward else " fwd")
        checks.append(RunCheck(label, float(r["time_s"]["median"]), predicted))
    return checks


def runs_markdown(checks: Sequence[RunCheck]) -> str:
    """The table of :func:`against_runs`: run, measured and predicted ms, error; the mean and
    largest absolute error."""
    lines = ["| run | measured (ms) | predicted (ms) | error |", "|---|---:|---:|---:|"]
    lines += [f"| {c.label} | {c.measured * 1e3:.2f} | {c.predicted * 1e3:.2f} | "
              f"{c.error:+.1%} |" for c in checks]
    errors = [abs(c.error) for c in checks]
    lines += ["", (f"Mean absolute error {sum(errors) / len(errors):.1%}, largest "
                  f"{max(errors):.1%} ({len(errors)} runs).")]
    return "\n".join(lines)
