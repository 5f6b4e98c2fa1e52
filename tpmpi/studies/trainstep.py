"""A training step of a GPT on a cluster: the layers' schedules composed into an iteration.

One iteration of global batch ``B`` on ``dp`` replicas of a TP group of ``tp`` ranks runs
``B / (b dp)`` micro-batches of ``b`` sequences (gradient accumulation), each: the embedding,
``n_layer`` blocks forward, the LM head and loss forward and backward, the blocks backward in
reverse order (each preceded by its recomputation), the embedding backward. The DP gradient
all-reduce runs once per iteration, during the last micro-batch's backward: gradients are
gathered into buckets of ``bucket_bytes`` in the order they become final (the schedules'
``GradsReady`` points, as :class:`tpmpi.DataParallel` forms them); each bucket is all-reduced
over the ``dp`` replicas as soon as it is full, one after another; what runs past the end of
backward is exposed (all of it, as one all-reduce of every gradient, with ``dp_overlap=False``:
Megatron-LM's "local" DDP). Then the optimizer: Adam, element-wise over the rank's parameter
shards (:data:`OPTIMIZERS`: bytes per parameter), after a TP all-reduce of the gradient norm.

Activation recomputation (Korthikanti et al. 2022): "none" keeps every block's saved bytes;
"selective" drops the attention core's (probabilities, dropout mask and output: ``5 a s^2 b``
bytes in half precision) and recomputes the core before the block's backward; "full" keeps only
each block's input and reruns the whole block forward (its collectives included) before its
backward, holding one block's activations at a time.

FLOPs follow Narayanan et al. 2021: the products of the model, forward and backward (3x the
forward), with the recomputed forward counted (their ``96 B s l h^2 (1 + s/6h + V/16lh)`` with
full recomputation; ``72 ... (1 + s/6h + V/12lh)`` without; selective adds the attention core
``4 B s^2 h`` per layer). ``tflops_per_gpu`` is those FLOPs over the iteration time and the
GPUs, ``mfu`` that over the device's dense peak in the dtype.

Memory per GPU: parameters and gradients (the dtype), the optimizer's state (float32 master
weights for half precision, Adam's two moments: :data:`OPTIMIZERS`), activations as
above plus the embedding's and the loss's (float32 probabilities of the rank's vocabulary
shard), and one DP bucket. A configuration whose total exceeds the device's memory is refused.

The schedules come from :func:`tpmpi.studies.gptblock._gpt_schedules` (provisional: the
layers' own ``schedule_for`` replaces it), priced step by step by :func:`price` against any
machine of :mod:`tpmpi.studies.machine`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Optional, Union

from ..core.args import check_int
from ..core.dtypes import resolve_dtype
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Step
from ..layers.data_parallel import BUCKET_BYTES
from .gptblock import GPTSchedules, GPTShape, _gpt_schedules
from .machine import ClusterMachine, Machine, Placement, Target, machine_for

RECOMPUTE = ("none", "selective", "full")
HALF = ("float16", "bfloat16")
OPTIMIZERS: dict[str, dict[str, tuple[int, int]]] = {
    "adam": {"half": (30, 12), "float32": (32, 8), "float64": (64, 16)},
    "apex-fp16": {"half": (62, 16)},
}
"""Adam's ``(bytes streamed, bytes of state)`` per parameter by dtype kind.

``"adam"``: one fused update. Half precision reads the gradient for the norm and for the update
(2 + 2), reads and writes the float32 master weight and both moments (24) and writes the half
weight (2), with master weight and moments as state (12); float32 reads the gradient twice (8)
and reads and writes weight and moments (24), the moments as state (8); float64 twice that.

``"apex-fp16"``: Megatron-LM's FP16_Optimizer of 2019-2020 (megatron/fp16 at commit 5281919420)
around apex's FusedAdam, half precision only: the overflow check converts every half gradient to
float32 and sums it (2 + 4 + 4), the gradients are copied to float32 master gradients (2 + 4),
unscaled (4 + 4), their norm taken (4), FusedAdam reads master weight, gradient and moments (16)
and writes weight and moments (12), the master weights are copied back to half (4 + 2): 62
bytes; state: master weight, master gradient and moments (16). The clip itself (another 8 when
the norm exceeds the threshold) is not counted.
"""
@dataclasses.dataclass
class Priced:
    """One schedule phase priced: ``seconds`` in all, split into ``product_s``, ``pointwise_s``
    and exposed ``collective_s``; ``collectives``: (step, seconds, exposed seconds) of each;
    ``ready``: (seconds from the phase's start, bytes) of each ``GradsReady``."""

    seconds: float = 0.0
    product_s: float = 0.0
    pointwise_s: float = 0.0
    collective_s: float = 0.0
    collectives: list[tuple[Collective, float, float]] = dataclasses.field(default_factory=list)
    ready: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    flops: int = 0


def price(steps: Iterable[Step], machine: Machine, overlap: bool = True) -> Priced:
    """Price ``steps`` run in order on one rank: products, element-wise work and collectives
    take the machine's time; a collective with ``during`` steps runs under them and only what
    exceeds their time is exposed, added when the last of them ends (``overlap=False``: every
    collective blocks). Gradients are ready at the time their ``GradsReady`` is reached."""
    steps = list(steps)
    took = {}
    for step in steps:
        if isinstance(step, Product):
            took[step.name] = machine.product_s(step)
        elif isinstance(step, Pointwise):
            took[step.name] = machine.pointwise_s(step)
    out = Priced()
    pending: dict[str, float] = {}  # last overlapped step -> exposed seconds added after it
    clock = 0.0
    for step in steps:
        if isinstance(step, Collective):
            t = machine.collective_s(step)
            hidden = sum(took.get(d, 0.0) for d in step.during) if overlap else 0.0
            exposed = max(0.0, t - hidden)
            out.collectives.append((step, t, exposed))
            out.collective_s += exposed
            if overlap and step.during and step.during[-1] in took:
                pending[step.during[-1]] = pending.get(step.during[-1], 0.0) + exposed
            else:
                clock += exposed
        elif isinstance(step, GradsReady):
            out.ready.append((clock, step.nbytes))
        else:
            clock += took[step.name] + pending.pop(step.name, 0.0)
            if isinstance(step, Product):
                out.product_s += took[step.name]
                out.flops += step.flops
            else:
                out.pointwise_s += took[step.name]
    out.seconds = clock + sum(pending.values())
    return out


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How the model is run: ``tp`` x ``dp`` ranks, micro-batch ``micro_batch`` and global batch
    ``global_batch`` (sequences), sequence parallelism, recomputation, dtype, whether TP
    collectives overlap the products the layers overlap them with (``overlap``) and the DP
    all-reduce overlaps backward (``dp_overlap``), DP bucket size."""

    tp: int
    dp: int
    micro_batch: int
    global_batch: int
    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: str = "bfloat16"
    overlap: bool = True
    dp_overlap: bool = True
    bucket_bytes: int = BUCKET_BYTES
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "micro_batch", "global_batch", "bucket_bytes"):
            check_int(name, getattr(self, name), 1)
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: expected one of "
                             f"{', '.join(RECOMPUTE)}")
        resolve_dtype(self.dtype)
        kinds = OPTIMIZERS.get(self.optimizer)
        if kinds is None or self.dtype_kind not in kinds:
            known = [name for name, k in OPTIMIZERS.items() if self.dtype_kind in k]
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {', '.join(known)} "
                             f"for dtype {self.dtype}")

    @property
    def dtype_kind(self) -> str:
        """"half" for float16 and bfloat16, else the dtype."""
        return "half" if self.dtype in HALF else self.dtype

    @property
    def optimizer_bytes(self) -> tuple[int, int]:
        """(bytes streamed, bytes of state) per parameter of the optimizer step."""
        return OPTIMIZERS[self.optimizer][self.dtype_kind]

    @property
    def micro_batches(self) -> Optional[int]:
        """Micro-batches per iteration, None when ``global_batch`` is not a multiple of
        ``micro_batch * dp``."""
        q, r = divmod(self.global_batch, self.micro_batch * self.dp)
        return q if r == 0 and q > 0 else None


@dataclasses.dataclass
class StepPrediction:
    """A configuration's predicted iteration (seconds, bytes, FLOP/s; see the module
    docstring). ``refused``: why the configuration cannot run (empty when it can)."""

    cluster: str
    shape: GPTShape
    config: StepConfig
    micro_batches: int = 0
    layer_fwd_s: float = 0.0
    layer_bwd_s: float = 0.0
    layer_recompute_s: float = 0.0
    layer: dict = dataclasses.field(default_factory=dict)
    embedding_loss_s: float = 0.0
    micro_batch_s: float = 0.0
    dp_allreduce_s: float = 0.0
    dp_exposed_s: float = 0.0
    optimizer_s: float = 0.0
    iteration_s: float = math.inf
    flops: float = 0.0
    tflops_per_gpu: float = 0.0
    mfu: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)
    collectives: list = dataclasses.field(default_factory=list)
    refused: str = ""

    @property
    def gpus(self) -> int:
        return self.config.tp * self.config.dp

    @property
    def mem_per_gpu_bytes(self) -> int:
        return int(sum(self.memory.values()))

    @property
    def label(self) -> str:
        c = self.config
        return f"tp={c.tp} dp={c.dp}" + (" sp" if c.sequence_parallel else "") \
            + (f" recompute={c.recompute}" if c.recompute != "none" else "")

    def to_json(self) -> dict:
        """The record of this configuration (``layer_fwd_s``, ``layer_bwd_s``,
        ``iteration_s``, ``tflops_per_gpu``, ``mfu``, ``mem_per_gpu_bytes`` and the rest)."""
        c = self.config
        return {
            "cluster": self.cluster, "tp": c.tp, "dp": c.dp, "gpus": self.gpus,
            "micro_batch": c.micro_batch, "global_batch": c.global_batch,
            "micro_batches": self.micro_batches, "sequence_parallel": c.sequence_parallel,
            "recompute": c.recompute, "dtype": c.dtype,
            "model": dataclasses.asdict(self.shape),
            "layer_fwd_s": self.layer_fwd_s, "layer_bwd_s": self.layer_bwd_s,
            "layer_recompute_s": self.layer_recompute_s,
            "embedding_loss_s": self.embedding_loss_s, "dp_allreduce_s": self.dp_allreduce_s,
            "dp_exposed_s": self.dp_exposed_s, "optimizer_s": self.optimizer_s,
            "iteration_s": None if math.isinf(self.iteration_s) else self.iteration_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
            "mem_per_gpu_bytes": self.mem_per_gpu_bytes, "memory": dict(self.memory),
            "collectives": list(self.collectives), "refused": self.refused,
        }


def model_flops(shape: GPTShape, sequences: int, recompute: str) -> float:
    """FLOPs of the products of one forward and backward of ``sequences`` sequences (all ranks),
    the recomputed forward counted (see the module docstring)."""
    h, s, kv = shape.n_embd, shape.seq, shape.kv_heads * shape.head_dim
    tokens = sequences * s
    attention = 4.0 * sequences * s * s * h
    layer = 2.0 * tokens * (h * (h + 2 * kv) + h * h + 8 * h * h) + attention
    logits = 2.0 * tokens * h * shape.vocab
    extra = {"none": 0.0, "selective": attention, "full": layer}[recompute]
    return 3.0 * (shape.n_layer * layer + logits) + shape.n_layer * extra


def _dp_allreduce(ready: Sequence[tuple[float, int]], end: float, machine: Machine,
                  config: StepConfig) -> tuple[float, float]:
    """``(total, exposed)`` seconds of the DP gradient all-reduce: buckets of the gradients
    ``ready`` ((time, bytes), in backward order) started when full, one after another, against
    a backward that ends at ``end`` (see the module docstring)."""
    if config.dp == 1 or not ready:
        return 0.0, 0.0

    def allreduce(nbytes: int) -> float:
        return machine.collective_s(Collective("dp.grads", "allreduce", "dp", config.dp,
                                               nbytes, config.dtype))
    if not config.dp_overlap:
        total = allreduce(sum(n for _, n in ready))
        return total, total
    buckets: list[list[float]] = []
    for when, nbytes in ready:
        if not buckets or buckets[-1][1] >= config.bucket_bytes:
            buckets.append([0.0, 0.0])
        buckets[-1] = [when, buckets[-1][1] + nbytes]
    clock = total = 0.0
    for when, size in buckets:
        took = allreduce(int(size))
        clock = max(clock, when) + took
        total += took
    return total, max(0.0, clock - end)


def _memory(s: GPTSchedules, shape: GPTShape, config: StepConfig, params: int) -> dict:
    """Bytes per GPU by kind (see the module docstring)."""
    e = resolve_dtype(config.dtype).itemsize
    block, core, n = s.block.saved_bytes, s.core.saved_bytes, shape.n_layer
    activations = {"none": n * block, "selective": n * (block - core),
                   "full": n * s.layer_input_bytes + block}[config.recompute]
    return {"parameters": params, "gradients": params,
            "optimizer": params // e * config.optimizer_bytes[1],
            "activations": activations + s.embedding.saved_bytes,
            "loss": s.head.saved_bytes,
            "dp_bucket": min(config.bucket_bytes, params) if config.dp > 1 else 0}


def _collective_rows(phases: Iterable[tuple[Priced, int]],
                     machine: Union[Machine, ClusterMachine]) -> list[dict]:
    """Each collective of the iteration: name, op, group, size, bytes, seconds, exposed
    seconds, times per iteration (and NCCL's algorithm, protocol and tier on a cluster)."""
    rows: dict[str, dict] = {}
    for priced, count in phases:
        for step, t, exposed in priced.collectives:
            row = rows.setdefault(step.name, {
                "name": step.name, "op": step.op, "group": step.group, "size": step.size,
                "bytes": step.nbytes, "seconds": t, "exposed_s": 0.0, "count": 0})
            row["exposed_s"] += exposed * count
            row["count"] += count
            if isinstance(machine, ClusterMachine) and step.size > 1:
                choice = machine.choice(step)
                row.update(algorithm=choice.algorithm, protocol=choice.protocol,
                           tier=machine.tier(step))
    return [r for r in rows.values() if r["size"] > 1]


def predict_step(target: Target, shape: GPTShape, config: StepConfig) -> StepPrediction:
    """The predicted iteration of ``shape`` under ``config`` on ``target`` (a cluster preset or
    a calibrated cluster); ``refused`` says why a configuration cannot run."""
    pred = StepPrediction(cluster=target.name, shape=shape, config=config)
    micro = config.micro_batches
    if micro is None:
        pred.refused = (f"global_batch={config.global_batch} is not a multiple of "
                        f"micro_batch x dp = {config.micro_batch * config.dp}")
        return pred
    peak = target.device.peak_flops(config.dtype)
    placement = Placement(config.tp, config.dp, target.gpus_per_node)
    machine = machine_for(target, placement)
    s = _gpt_schedules(shape, config.micro_batch, config.tp, config.sequence_parallel,
                       config.dtype)
    ov = config.overlap
    fwd, bwd = price(s.block.forward, machine, ov), price(s.block.backward, machine, ov)
    recompute = {"none": Priced(), "selective": price(s.core.forward, machine, ov),
                 "full": fwd}[config.recompute]
    head_f, head_b = price(s.head.forward, machine, ov), price(s.head.backward, machine, ov)
    emb_f, emb_b = price(s.embedding.forward, machine, ov), price(s.embedding.backward,
                                                                   machine, ov)
    n = shape.n_layer
    layer_bwd = recompute.seconds + bwd.seconds
    # the last micro-batch's backward: head, then blocks n-1 .. 0, then the embedding
    ready = list(head_b.ready)
    start = head_b.seconds
    for _ in range(n):
        ready += [(start + recompute.seconds + t, b) for t, b in bwd.ready]
        start += layer_bwd
    ready += [(start + t, b) for t, b in emb_b.ready]
    backward_end = start + emb_b.seconds
    params = s.embedding.param_bytes + n * s.block.param_bytes + s.head.param_bytes
    pred.micro_batches = micro
    pred.layer_fwd_s, pred.layer_bwd_s, pred.layer_recompute_s = fwd.seconds, bwd.seconds, \
        recompute.seconds
    pred.layer = {
        phase: {"seconds": p.seconds, "products_s": p.product_s, "pointwise_s": p.pointwise_s,
                "collectives_s": p.collective_s}
        for phase, p in (("forward", fwd), ("backward", bwd), ("recompute", recompute))}
    pred.embedding_loss_s = emb_f.seconds + emb_b.seconds + head_f.seconds + head_b.seconds
    pred.micro_batch_s = n * (fwd.seconds + layer_bwd) + pred.embedding_loss_s
    pred.dp_allreduce_s, pred.dp_exposed_s = _dp_allreduce(ready, backward_end, machine, config)
    e = resolve_dtype(config.dtype).itemsize
    optimizer = (Pointwise("optimizer.adam", params // e * config.optimizer_bytes[0], "float32"),
                 Collective("optimizer.grad_norm", "allreduce", "tp", config.tp, 4, "float32"))
    opt = price(optimizer, machine)
    pred.optimizer_s = opt.seconds
    pred.iteration_s = micro * pred.micro_batch_s + pred.dp_exposed_s + pred.optimizer_s
    pred.flops = model_flops(shape, config.global_batch, config.recompute)
    pred.tflops_per_gpu = pred.flops / pred.iteration_s / pred.gpus / 1e12
    pred.mfu = pred.tflops_per_gpu * 1e12 / peak
    pred.memory = _memory(s, shape, config, params)
    phases = [(fwd, n * micro), (bwd, n * micro), (recompute, n * micro), (head_f, micro),
              (head_b, micro), (emb_f, micro), (emb_b, micro), (opt, 1)]
    pred.collectives = _collective_rows(phases, machine)
    if config.dp > 1:
        pred.collectives.append({
            "name": "dp.grads", "op": "allreduce", "group": "dp", "size": config.dp,
            "bytes": params, "seconds": pred.dp_allreduce_s, "exposed_s": pred.dp_exposed_s,
            "count": 1})
    capacity = target.device.memory_bytes
    if pred.mem_per_gpu_bytes > capacity:
        pred.refused = (f"needs {pred.mem_per_gpu_bytes / 2**30:.1f} GiB per GPU, the "
                        f"{target.device.name} has {capacity / 2**30:.1f} GiB")
    return pred

