"""``plan --cluster``: rank TP x DP configurations of a GPT training step on a cluster preset, and
explain a prediction term by term.

:func:`plan_cluster` predicts every combination of the given TP and DP sizes
(:func:`tpmpi.studies.trainstep.predict_step`), feasible ones first by iteration time, then the
refused ones with the reason (memory, a global batch that does not split into micro-batches).
:func:`format_cluster_plan` prints the ranking and why the first wins over the runner-up;
:func:`explain_step` prints one configuration's breakdown: per block forward and backward
(products, element-wise work, exposed collectives), every collective with NCCL's algorithm and
the tier it runs on, the DP all-reduce and how much of it backward hides, the optimizer, the
iteration, FLOP/s and memory. :func:`parse_model` and :func:`parse_sizes` read the CLI's
``--model layers=L,hidden=H,heads=A,seq=S,vocab=V`` and ``--tp 1,2,4,8`` / ``--dp 1-128``;
:func:`load_target` its ``--cluster`` (a preset, a preset file or a calibration file).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..core.args import check_int, parse_int
from .cluster import Cluster, load_cluster, preset_names
from .gptshape import GPTShape
from .machine import Target, calibrated_cluster
from .trainstep import StepConfig, StepPrediction, predict_step

MODEL_KEYS = {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "seq": "seq",
              "vocab": "vocab", "kv_heads": "n_kv_head", "dropout": "dropout", "bias": "bias"}
FLAGS = ("dropout", "bias")


def parse_model(spec: str) -> GPTShape:
    """``"layers=L,hidden=H,heads=A,seq=S,vocab=V[,kv_heads=K][,dropout=0|1][,bias=0|1]"``."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, text = item.partition("=")
        if not sep or key not in MODEL_KEYS:
            raise ValueError(f"model={spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(MODEL_KEYS)}")
        try:
            number = parse_int(key, text)
        except ValueError:
            raise ValueError(f"model={spec!r}: {key}={text!r}: expected an integer") from None
        values[MODEL_KEYS[key]] = bool(number) if key in FLAGS else number
    missing = [k for k in ("layers", "hidden", "heads", "seq", "vocab")
               if MODEL_KEYS[k] not in values]
    if missing:
        raise ValueError(f"model={spec!r}: missing {', '.join(missing)}")
    return GPTShape(**values)


def parse_sizes(name: str, spec: str) -> list[int]:
    """``"1,2,4,8"`` or ``"1-128"`` (every integer from 1 to 128) or a mix; sorted, unique."""
    sizes: set[int] = set()
    for item in filter(None, (part.strip() for part in str(spec).split(","))):
        low, sep, high = item.partition("-")
        try:
            first, last = parse_int(name, low), parse_int(name, high if sep else low)
        except ValueError:
            raise ValueError(f"{name}={spec!r}: {item!r} is not N or N-M") from None
        if first < 1 or last < first:
            raise ValueError(f"{name}={spec!r}: {item!r}: expected 1 <= N <= M")
        sizes.update(range(first, last + 1))
    if not sizes:
        raise ValueError(f"{name}={spec!r}: expected sizes such as 1,2,4,8 or 1-128")
    return sorted(sizes)


def load_target(name: str) -> Target:
    """The cluster ``name`` names: a preset (:func:`tpmpi.studies.cluster.preset_names`), a
    preset file of your own, or a ``calibrate`` file (a CPU cluster of the ranks it ran on:
    :func:`tpmpi.studies.machine.calibrated_cluster`). ValueError naming the problem."""
    if name not in preset_names() and name.endswith(".json") and Path(name).is_file():
        try:
            data = json.loads(Path(name).read_text())
        except (OSError, ValueError):
            data = None  # load_cluster names the problem
        if isinstance(data, dict) and "alpha" in data and "rates" in data:
            return calibrated_cluster(name)
    return load_cluster(name)


def default_dtype(target: Target) -> str:
    """The dtype a plan on ``target`` takes by default: bfloat16 on a GPU that has it, else
    float16; float32 on a calibrated (CPU) cluster."""
    if not isinstance(target, Cluster):
        return "float32"
    return "bfloat16" if "bfloat16" in target.device.peak else "float16"


def plan_cluster(cluster: Union[str, Target], shape: GPTShape, *, micro_batch: int,
                 global_batch: int, tp: Iterable[int], dp: Iterable[int],
                 sequence_parallel: bool = False, recompute: str = "none",
                 dtype: str = "bfloat16", gpus: Optional[int] = None,
                 **options: Any) -> list[StepPrediction]:
    """Every ``tp`` x ``dp`` configuration of ``shape`` on ``cluster`` (a preset name, a preset
    file, or a :class:`~tpmpi.studies.machine.Target`), only those of ``gpus`` GPUs when given:
    the feasible ones by iteration time, then the refused ones. ``options``: the other fields
    of :class:`~tpmpi.studies.trainstep.StepConfig` (``overlap``, ``ddp``,
    ``bucket_bytes``, ``optimizer``)."""
    target = load_cluster(cluster) if isinstance(cluster, str) else cluster
    if gpus is not None:
        check_int("gpus", gpus, 1)
    preds = []
    for t in sorted(set(tp)):
        for d in sorted(set(dp)):
            if gpus is not None and t * d != gpus:
                continue
            config = StepConfig(tp=t, dp=d, micro_batch=micro_batch, global_batch=global_batch,
                                sequence_parallel=sequence_parallel, recompute=recompute,
                                dtype=dtype, **options)
            preds.append(predict_step(target, shape, config))
    if not preds:
        raise ValueError(f"gpus={gpus}: no tp x dp of the sizes given makes that many GPUs")
    return sorted(preds, key=lambda p: (bool(p.refused), p.iteration_s, p.gpus))


def _terms(p: StepPrediction) -> dict[str, float]:
    """The iteration's seconds by term."""
    n, micro = p.shape.n_layer, p.micro_batches
    layer = p.layer
    return {
        "block products": micro * n * sum(layer[k]["products_s"] for k in layer),
        "block element-wise work": micro * n * sum(layer[k]["pointwise_s"] for k in layer),
        "block TP communication": micro * n * sum(layer[k]["collectives_s"] for k in layer),
        "embedding and loss": micro * p.embedding_loss_s,
        "exposed DP all-reduce": p.dp_exposed_s, "optimizer": p.optimizer_s}


def _ms(seconds: float) -> str:
    """Milliseconds, three decimals below 10 ms (small problems), one above."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if abs(ms) < 10 else f"{ms:.1f}"


def format_cluster_plan(preds: Sequence[StepPrediction], top: Optional[int] = None) -> str:
    """The ranking (``top`` rows of the feasible ones) and why the first wins; the refused ones
    are counted, with the first's reason."""
    ok = [p for p in preds if not p.refused]
    refused = [p for p in preds if p.refused]
    heads = ["order", "config", "gpus", "micro", "layer_fwd_ms", "layer_bwd_ms", "dp_exposed_ms",
             "iteration_ms", "TFLOP/s/GPU", "MFU", "mem_GiB"]
    rows = [[str(i + 1), p.label, str(p.gpus), str(p.micro_batches), _ms(p.layer_fwd_s),
             _ms(p.layer_bwd_s + p.layer_recompute_s), _ms(p.dp_exposed_s), _ms(p.iteration_s),
             f"{p.tflops_per_gpu:.1f}", f"{p.mfu:.1%}", f"{p.mem_per_gpu_bytes / 2**30:.1f}"]
            for i, p in enumerate(ok[:top])]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    lines = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [heads, *rows]]
    if ok:
        first = ok[0]
        why = (f"why {first.label} first: {_ms(first.iteration_s)} ms per iteration on "
               f"{first.gpus} GPUs = " + " + ".join(
                   f"{name} {_ms(v)}" for name, v in _terms(first).items() if v > 0))
        if len(ok) > 1:
            second = ok[1]
            diff = {k: v - _terms(first)[k] for k, v in _terms(second).items()}
            worst = max(diff, key=lambda k: diff[k])
            why += (f"; runner-up {second.label} ({_ms(second.iteration_s)} ms) loses "
                    f"{_ms(second.iteration_s - first.iteration_s)} ms, most on {worst} "
                    f"(+{_ms(diff[worst])} ms)")
        lines.append(why + ".")
    else:
        lines.append("no configuration fits.")
    if refused:
        lines.append(f"{len(refused)} configuration(s) refused, e.g. {refused[0].label}: "
                     f"{refused[0].refused}.")
    return "\n".join(lines)


def explain_step(p: StepPrediction) -> str:
    """One configuration's prediction term by term (see the module docstring)."""
    c, s = p.config, p.shape
    out = [(f"{p.cluster}: GPT layers={s.n_layer} hidden={s.n_embd} heads={s.n_head} "
           f"seq={s.seq} vocab={s.vocab} ({s.params / 1e9:.3g}B parameters), {p.label}, "
           f"{p.gpus} GPUs, micro-batch {c.micro_batch} x {p.micro_batches} x dp {c.dp} = "
           f"global batch {c.global_batch}, {c.dtype}")]
    if p.refused:
        return "\n".join([*out, f"refused: {p.refused}"])
    for phase, v in p.layer.items():
        if v["seconds"] > 0:
            out.append(f"  per block {phase}: {_ms(v['seconds'])} ms = products "
                       f"{_ms(v['products_s'])} + element-wise {_ms(v['pointwise_s'])} + "
                       f"exposed collectives {_ms(v['collectives_s'])}")
    out.append(f"  embedding, LM head and loss (forward + backward): {_ms(p.embedding_loss_s)} ms"
               " per micro-batch")
    out.append("  collectives (seconds each, exposed per iteration):")
    for r in p.collectives:
        how = f" {r['algorithm']}/{r['protocol']} on {r['tier']}" if "algorithm" in r else ""
        out.append(f"    {r['name']}: {r['op']} of {r['bytes'] / 2**20:.1f} MiB over "
                   f"{r['group']}={r['size']}{how}: {_ms(r['seconds'])} ms x {r['count']}, "
                   f"exposed {_ms(r['exposed_s'])} ms")
    if c.dp > 1:
        hidden = p.dp_allreduce_s - p.dp_exposed_s
        out.append(f"  DP gradient all-reduce {_ms(p.dp_allreduce_s)} ms, {_ms(hidden)} ms hidden "
                   f"under backward, {_ms(p.dp_exposed_s)} ms exposed")
    out.append(f"  optimizer ({c.optimizer}): {_ms(p.optimizer_s)} ms")
    out.append(f"  iteration {_ms(p.iteration_s)} ms = " + " + ".join(
        f"{k} {_ms(v)}" for k, v in _terms(p).items()))
    out.append(f"  {p.flops / 1e15:.3g} PFLOP per iteration (Narayanan et al. 2021, "
               f"recomputation counted): {p.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU "
               f"{p.mfu:.1%}")
    out.append(f"  memory per GPU {p.mem_per_gpu_bytes / 2**30:.2f} GiB = " + " + ".join(
        f"{k} {v / 2**30:.2f}" for k, v in p.memory.items()))
    return "\n".join(out)


def plan_records(preds: Sequence[StepPrediction]) -> list[dict]:
    """The JSON of ``--json FILE``: one object per configuration, in ranking order."""
    return [dict(p.to_json(), order=i + 1) for i, p in enumerate(preds)]

