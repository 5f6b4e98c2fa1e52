"""The transformer problems (schemes "attention", "block", "gpt" of a
:class:`~tpmpi.studies.problem.Problem`) as plain data: their model config, the schedule their
layers list for one rank (priced by the cost model like every other scheme), their model FLOPs
and the split of a step into kinds of work. No MPI, nothing built.

Model FLOPs follow Narayanan et al. 2021 (the convention of published MFU figures): only the
matrix products of the model, counted as ``2`` per multiply-add, the backward twice the forward,
no recomputation, causal masking not discounted, biases, LayerNorms, softmax and the embedding
lookup not counted. One forward over ``N = B T`` tokens:

``F = 2 N (L P_block + d V) + 4 B T^2 Hq hd L``

with ``P_block = d (Hq + 2 Hkv) hd + Hq hd d + 8 d^2`` the weights of a block's four linear
layers (``12 d^2`` without grouped-query heads), ``2 N d V`` the LM head (gpt only; ``L = 1``
and no head for "block"; only the attention's two linears for "attention") and ``4 B T^2 Hq
hd`` the scores and the context of every head. Forward + backward is ``3 F``: for a GPT with
``Hkv = Hq`` that is Narayanan's ``72 B T L d^2 (1 + T / (6 d) + V / (12 L d))``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from ..core.schedule import Collective, Pointwise, Product, Schedule
from ..layers.attention import ParallelAttention
from ..layers.block import TransformerBlock
from ..models.config import GPTConfig
from ..models.gpt import GPT
from .problem import TRANSFORMER, Problem

SPLIT_ORDER = ("products", "attention_core", "elementwise")
"""The compute parts of a split, in the order reports list them (collectives follow)."""
CORE_STEPS = ("scores", "context", "softmax")
"""Name parts of the attention core's steps (the score and context products, the softmax)."""


def is_transformer(problem: Problem) -> bool:
    """Whether ``problem`` is one of the transformer schemes."""
    return problem.scheme in TRANSFORMER


def batch_of(problem: Problem) -> int:
    """Sequences in the problem: ``m / seq`` (ValueError naming ``--m`` unless a multiple)."""
    seq = problem.seq or 0
    if seq < 1 or problem.m % seq:
        raise ValueError(f"--m {problem.m}: expected a multiple of --seq {seq} (m is the "
                         f"tokens, batch x seq)")
    return problem.m // seq


def sequence_parallel(problem: Problem) -> bool:
    """The problem's option ``sequence_parallel``."""
    return bool(problem.opts.get("sequence_parallel", False))


def config_of(problem: Problem) -> GPTConfig:
    """The :class:`~tpmpi.models.GPTConfig` of the problem: width ``k``, ``heads`` (default
    ``k // 64``), ``kv_heads``, ``layers`` (1 but for gpt), ``vocab`` (gpt), block size
    ``seq``; ValueError naming the flag of a size that cannot work."""
    heads = problem.heads or max(1, problem.k // 64)
    try:
        return GPTConfig(problem.vocab or 1, problem.seq or 1, problem.layers or 1, heads,
                         problem.k, n_kv_head=problem.kv_heads, bias=True)
    except ValueError as exc:
        flag = {"n_embd": "--k", "n_head": "--heads", "n_kv_head": "--kv-heads",
                "n_layer": "--layers", "vocab_size": "--vocab", "block_size": "--seq"}
        name = str(exc).split("=", 1)[0]
        raise ValueError(f"{flag.get(name, name)}: {exc}") from None


def linear_params(cfg: GPTConfig, scheme: str) -> int:
    """Weights of the problem's linear layers (the products model FLOPs count), all ranks."""
    d, hd = cfg.n_embd, cfg.head_size
    attn = d * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * d
    if scheme == "attention":
        return attn
    block = attn + 8 * d * d
    return block if scheme == "block" else cfg.n_layer * block + d * cfg.vocab_size


def check_shape(problem: Problem, dp: int = 1) -> None:
    """ValueError naming the flag when the problem's transformer cannot be built: --m not a
    multiple of --seq (times ``dp``, each replica taking whole sequences), heads that do not
    divide --k, kv heads that do not divide the heads."""
    batch = batch_of(problem)
    if batch % dp:
        raise ValueError(f"--m {problem.m}: {batch} sequences of --seq {problem.seq} do not "
                         f"split into --dp {dp} replicas of whole sequences; expected a "
                         f"multiple of {problem.m // batch * dp}")
    config_of(problem)


def model_flops(problem: Problem) -> float:
    """Model FLOPs of one forward (the module docstring's ``F``); ``3 F`` is a training step."""
    cfg, b = config_of(problem), batch_of(problem)
    layers = cfg.n_layer if problem.scheme == "gpt" else 1
    attention = 4.0 * b * cfg.block_size ** 2 * cfg.n_head * cfg.head_size * layers
    return 2.0 * problem.m * linear_params(cfg, problem.scheme) + attention


def schedule(problem: Problem, tp: int) -> Schedule:
    """The schedule of one rank of a ``tp``-rank group for the problem, as its layer lists it
    (:meth:`ParallelAttention.schedule_for`, :meth:`TransformerBlock.schedule_for`,
    :meth:`GPT.schedule_for`)."""
    cfg, b, sp = config_of(problem), batch_of(problem), sequence_parallel(problem)
    seq = problem.seq or 1
    if problem.scheme == "gpt":
        return GPT.schedule_for(cfg, batch=b, seq=seq, tp=tp, sequence_parallel=sp,
                                dtype=problem.dtype, backward=problem.backward)
    layer = ParallelAttention if problem.scheme == "attention" else TransformerBlock
    return layer.schedule_for(b, seq, cfg.n_embd, cfg.n_head, tp, n_kv_head=cfg.n_kv_head,
                              sequence_parallel=sp, dtype=problem.dtype,
                              backward=problem.backward)


def model_fields(problem: Problem) -> Optional[dict[str, Any]]:
    """The record's ``model`` object: ``d_model``, ``heads``, ``kv_heads``, ``head_dim``,
    ``seq``, ``batch``, ``layers``, ``vocab`` (gpt, else None), ``sequence_parallel``,
    ``params`` (the linear weights model FLOPs count) and ``model_flops`` (forward, and
    ``step_flops``: with backward 3 x forward); None for the other schemes."""
    if not is_transformer(problem):
        return None
    cfg = config_of(problem)
    fwd = model_flops(problem)
    return {"d_model": cfg.n_embd, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head,
            "head_dim": cfg.head_size, "seq": problem.seq, "batch": batch_of(problem),
            "layers": cfg.n_layer if problem.scheme == "gpt" else 1,
            "vocab": cfg.vocab_size if problem.scheme == "gpt" else None,
            "sequence_parallel": sequence_parallel(problem),
            "params": linear_params(cfg, problem.scheme), "model_flops": fwd,
            "step_flops": fwd * (3 if problem.backward else 1)}


def kind_of(step: Any) -> str:
    """The split's part a schedule step belongs to: ``products`` (the layers' local GEMMs),
    ``attention_core`` (scores, softmax, attention dropout, context), ``elementwise`` (the
    rest of the element-wise work) or the collective's operation (``allreduce``, ...)."""
    if isinstance(step, Collective):
        return step.op
    parts = step.name.split(".")
    core = any(p in CORE_STEPS for p in parts) or (
        "dropout" in parts and (parts[0] == "dropout" or "attn" in parts))
    if core:
        return "attention_core"
    return "products" if isinstance(step, Product) else "elementwise"


def split(sched: Schedule, machine: Any, *, backward: bool) -> dict[str, float]:
    """Seconds of each part (:func:`kind_of`) of the schedule on ``machine`` (a
    :class:`~tpmpi.studies.pricing.Machine`), collectives at their whole time (hidden or
    not): where a step's time goes before overlap."""
    out: dict[str, float] = {}
    for step in sched.steps(backward):
        if isinstance(step, Product):
            took = machine.product_s(step)
        elif isinstance(step, Pointwise):
            took = machine.pointwise_s(step)
        elif isinstance(step, Collective):
            took = machine.collective_s(step) if step.size > 1 else 0.0
        else:
            continue
        key = kind_of(step)
        out[key] = out.get(key, 0.0) + took
    return out


def mfu(gflops: Optional[float], peak_gflops: Optional[float]) -> Optional[float]:
    """Model FLOP/s as a fraction of ``peak_gflops`` (None without both)."""
    return gflops / peak_gflops if gflops and peak_gflops else None


def describe(model: Mapping[str, Any]) -> str:
    """A record's model as one line: ``d=1024 H=16/16 T=512 B=4 L=1 V=- sp``."""
    kv = model.get("kv_heads")
    return (f"d={model['d_model']} H={model['heads']}/{kv} T={model['seq']} "
            f"B={model['batch']} L={model['layers']} V={model.get('vocab') or '-'}"
            + (" sp" if model.get("sequence_parallel") else ""))
