"""A training step of a GPT on a cluster: the layers' schedules composed into an iteration.

One iteration of global batch ``B`` on ``dp`` replicas of a TP group of ``tp`` ranks runs
``B / (b dp)`` micro-batches of ``b`` sequences (gradient accumulation), each the GPT's
schedule (:data:`GPT_SCHEDULE`, the model's own ``schedule_for``: embedding, ``n_layer``
blocks, LM head and loss forward, then backward in reverse order) with, under recomputation,
each block's backward preceded by its recomputed steps (:func:`micro_batch_schedule`). The DP
gradient all-reduce runs once per iteration, in the last micro-batch's backward, as the data
parallelism of ``ddp`` runs it (:data:`DDP`):

* ``"overlap"``: :meth:`tpmpi.DataParallel.schedule_for`'s buckets of ``bucket_bytes``, each
  all-reduced over the replicas as soon as its gradients are final (the schedule's
  ``GradsReady``), one after another, during the rest of backward (PyTorch DDP's scheme);
* ``"blocking"``: the same buckets all-reduced after backward;
* ``"megatron-local"``: Megatron-LM's own DDP of 2019-2020 (``--DDP-impl local``, the default;
  megatron/model/distributed.py): after backward every gradient is flattened into one buffer
  (a copy), all-reduced at once, scaled by ``1/dp`` and copied back into the gradients.

Every step is priced by the one pricer, :func:`tpmpi.studies.pricing.price`, on the machine of
the target (:func:`tpmpi.studies.machine.machine_for`); what the DP all-reduce adds to the last
micro-batch's backward is its exposed time. Then the optimizer: Adam, element-wise over the
rank's parameter shards (:data:`OPTIMIZERS`: bytes per parameter), after a TP all-reduce of
the gradient norm.

Activation recomputation (Korthikanti et al. 2022): "none" keeps every block's saved bytes;
"full" keeps only each block's input and reruns
the whole block forward (its collectives included) before its backward, holding one block's
activations at a time. "selective" recomputes the attention core, and the core of tpmpi's
attention already does so: it keeps no ``s x s`` probabilities (nor dropout mask: the mask is
drawn again from its seed) but, per query row, the float32 log-sum-exp of the scores, and its
backward forms the scores again (``attn.scores.recompute``). What Korthikanti et al.'s selective
recomputation drops (the probabilities, dropout mask and dropped probabilities, ``5 a s^2 b / t``
bytes per block in half precision) is never kept; what is left to drop is the log-sum-exp
(``4 a s b / t`` bytes, :func:`core_saved_bytes`), recomputed before the block's backward by the
scores product and the softmax pass (the block's forward steps :data:`CORE`).

FLOPs follow Narayanan et al. 2021: the products of the model, forward and backward (3x the
forward), with the recomputed forward counted (their ``96 B s l h^2 (1 + s/6h + V/16lh)`` with
full recomputation; ``72 ... (1 + s/6h + V/12lh)`` without; selective adds the scores product,
``2 B s^2 h`` per layer). The scores product that tpmpi's attention backward reruns is not in
this count (it is in the time): the convention counts the model's FLOPs, not the
implementation's. ``tflops_per_gpu`` is those FLOPs over the iteration time and the
GPUs, ``mfu`` that over the device's dense peak in the dtype.

Memory per GPU: parameters and gradients (the dtype), the optimizer's state (float32 master
weights for half precision, Adam's two moments: :data:`OPTIMIZERS`), activations as
above plus the embedding's and the loss's (float32 probabilities of the rank's vocabulary
shard), and one DP bucket. A configuration whose total exceeds the device's memory is refused.

The block's schedule is described once, by :data:`GPT_SCHEDULE`; :func:`split_gpt` takes it
apart by step name (block ``i``: ``transformer.h.<i>.``) and checks that every block lists the
same steps, and :func:`micro_batch_schedule` puts it back together (without recomputation it is
the model's schedule, step for step: the tests check it).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Optional

from ..core.args import check_int
from ..core.dtypes import resolve_dtype
from ..core.partition import largest_block
from ..core.schedule import Collective, GradsReady, Pointwise, Schedule, Step, chain
from ..layers.data_parallel import BUCKET_BYTES, DataParallel
from ..core.heads import head_partition
from ..models.gpt import GPT
from .gptshape import GPTShape
from .machine import ClusterMachine, Placement, Target, machine_for
from .pricing import Breakdown, Machine, price

GPT_SCHEDULE = GPT.schedule_for
"""The one description of the GPT's schedule: the model's own (``tpmpi.models.GPT``)."""

RECOMPUTE = ("none", "selective", "full")
DDP = ("overlap", "blocking", "megatron-local")
CORE = ("attn.scores", "attn.softmax")
"""The attention core's forward steps that form the per-row log-sum-exp it keeps (what
selective recomputation redoes), as ``tpmpi.ParallelAttention.schedule_for`` names them inside a
block."""
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


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How the model is run: ``tp`` x ``dp`` ranks, micro-batch ``micro_batch`` and global batch
    ``global_batch`` (sequences), sequence parallelism, recomputation, dtype, whether TP
    collectives overlap the products the layers overlap them with (``overlap``), how data
    parallelism all-reduces the gradients (``ddp``, one of :data:`DDP`), DP bucket size,
    optimizer (:data:`OPTIMIZERS`)."""

    tp: int
    dp: int
    micro_batch: int
    global_batch: int
    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: str = "bfloat16"
    overlap: bool = True
    ddp: str = "overlap"
    bucket_bytes: int = BUCKET_BYTES
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "micro_batch", "global_batch", "bucket_bytes"):
            check_int(name, getattr(self, name), 1)
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: expected one of "
                             f"{', '.join(RECOMPUTE)}")
        if self.ddp not in DDP:
            raise ValueError(f"ddp={self.ddp!r}: expected one of {', '.join(DDP)}")
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
    attention = 4.0 * sequences * s * s * h     # scores and context
    layer = 2.0 * tokens * (h * (h + 2 * kv) + h * h + 8 * h * h) + attention
    logits = 2.0 * tokens * h * shape.vocab
    extra = {"none": 0.0, "selective": attention / 2, "full": layer}[recompute]
    return 3.0 * (shape.n_layer * layer + logits) + shape.n_layer * extra


@dataclasses.dataclass(frozen=True)
class GPTParts:
    """A GPT's schedule taken apart (:func:`split_gpt`): the ``embedding``'s steps (forward
    before the first block, backward after the last), one ``block`` (step names relative to
    the block) that each of the ``n_layer`` blocks runs, and the ``head`` (final LayerNorm, LM
    head and loss: forward after the last block, backward before the first). Each part holds
    the parameter bytes of its gradients; the block its saved bytes, the embedding the rest."""

    embedding: Schedule
    block: Schedule
    head: Schedule
    n_layer: int


BLOCKS = "transformer.h."


def _name(step: Step) -> str:
    return step.names[0] if isinstance(step, GradsReady) else step.name


def _relative(step: Step, prefix: str) -> Step:
    """``step`` with ``prefix`` taken off its names (the inverse of ``Schedule.prefixed``)."""
    cut = len(prefix)
    if isinstance(step, GradsReady):
        return dataclasses.replace(step, names=tuple(n[cut:] for n in step.names))
    if isinstance(step, Collective):
        return dataclasses.replace(step, name=step.name[cut:],
                                   during=tuple(d[cut:] for d in step.during))
    return dataclasses.replace(step, name=step.name[cut:])


def _grads(steps: Iterable[Step], prefix: str = "") -> int:
    """Bytes of the gradients ready in ``steps`` (only those named ``prefix...``)."""
    return sum(s.nbytes for s in steps if isinstance(s, GradsReady)
               and s.names[0].startswith(prefix))


def split_gpt(schedule: Schedule, n_layer: int, block_saved_bytes: int) -> GPTParts:
    """The parts of a GPT's ``schedule`` (:data:`GPT_SCHEDULE`) of ``n_layer`` blocks, block
    ``i`` being the steps named ``transformer.h.<i>.``; ``block_saved_bytes``: what one block
    keeps for backward. A block's gradients may be ready after every block's backward (under
    sequence parallelism, once the shares are summed): those ``GradsReady`` stay where they are,
    in the embedding's backward, and count to the block's parameter bytes. ValueError when the
    blocks do not list the same steps or other steps come between them."""
    def cut(steps: Sequence[Step], where: str) -> tuple[list[Step], list[list[Step]], list[Step]]:
        before: list[Step] = []
        blocks: dict[int, list[Step]] = {}
        after: list[Step] = []
        for step in steps:
            name = _name(step)
            if not name.startswith(BLOCKS):
                (after if blocks else before).append(step)
                continue
            index = name[len(BLOCKS):].split(".", 1)[0]
            if after and isinstance(step, GradsReady):
                after.append(step)
                continue
            if after:
                raise ValueError(f"GPT schedule: {where} step {_name(after[0])!r} comes "
                                 f"between blocks")
            blocks.setdefault(int(index), []).append(
                _relative(step, f"{BLOCKS}{index}."))
        order = list(blocks) if where == "forward" else list(reversed(blocks))
        if order != list(range(n_layer)):
            raise ValueError(f"GPT schedule: {where} runs blocks {order}, expected "
                             f"0 .. {n_layer - 1} in order")
        return before, [blocks[i] for i in range(n_layer)], after

    emb_f, blocks_f, head_f = cut(schedule.forward, "forward")
    head_b, blocks_b, emb_b = cut(schedule.backward, "backward") if schedule.backward else \
        ([], [[] for _ in range(n_layer)], [])
    for i in range(1, n_layer):
        if blocks_f[i] != blocks_f[0] or blocks_b[i] != blocks_b[0]:
            raise ValueError(f"GPT schedule: block {i} does not run block 0's steps")
    late = [_grads(emb_b, f"{BLOCKS}{i}.") for i in range(n_layer)]
    if late.count(late[0]) != n_layer:
        raise ValueError(f"GPT schedule: the blocks' late gradients differ: {late}")
    block = Schedule(tuple(blocks_f[0]), tuple(blocks_b[0]), _grads(blocks_b[0]) + late[0],
                     block_saved_bytes)
    rest = schedule.saved_bytes - n_layer * block_saved_bytes
    return GPTParts(Schedule(tuple(emb_f), tuple(emb_b), _grads(emb_b) - sum(late), rest),
                    block, Schedule(tuple(head_f), tuple(head_b), _grads(head_b), 0), n_layer)


@functools.lru_cache(maxsize=64)
def gpt_parts(shape: GPTShape, micro_batch: int, tp: int, sequence_parallel: bool,
              dtype: str) -> GPTParts:
    """The parts (:func:`split_gpt`) of :data:`GPT_SCHEDULE` for ``shape`` on ``micro_batch``
    sequences over ``tp`` ranks; a block's saved bytes are what one more block adds."""
    def schedule(layers: int) -> Schedule:
        return GPT_SCHEDULE(dataclasses.replace(shape, n_layer=layers).config(),
                            batch=micro_batch, seq=shape.seq, tp=tp,
                            sequence_parallel=sequence_parallel, dtype=dtype)
    whole = schedule(shape.n_layer)
    block_saved = schedule(shape.n_layer + 1).saved_bytes - whole.saved_bytes
    return split_gpt(whole, shape.n_layer, block_saved)


def recomputed(block: Schedule, recompute: str) -> tuple[Step, ...]:
    """The block's forward steps that ``recompute`` reruns before the block's backward."""
    if recompute == "full":
        return block.forward
    if recompute == "selective":
        return tuple(s for s in block.forward if _name(s) in CORE)
    return ()


def micro_batch_schedule(parts: GPTParts, recompute: str = "none") -> Schedule:
    """One micro-batch's forward and backward: the parts in order, each block's backward
    preceded by its recomputed steps (named ``transformer.h.<i>.recompute.``). With
    ``recompute="none"`` this is the GPT's schedule the parts came from."""
    redo = Schedule(recomputed(parts.block, recompute)).prefixed("recompute").forward
    block = dataclasses.replace(parts.block, backward=redo + parts.block.backward)
    return chain([parts.embedding,
                  *(block.prefixed(f"{BLOCKS.rstrip('.')}.{i}") for i in range(parts.n_layer)),
                  parts.head])


def _blocking(schedule: Schedule) -> Schedule:
    """``schedule`` with every collective waited for where it starts (nothing overlapped)."""
    def block(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(dataclasses.replace(s, during=()) if isinstance(s, Collective) else s
                     for s in steps)
    return dataclasses.replace(schedule, forward=block(schedule.forward),
                               backward=block(schedule.backward))


def with_data_parallel(schedule: Schedule, config: StepConfig) -> Schedule:
    """``schedule`` (one micro-batch) with the gradient all-reduce over the ``config.dp``
    replicas in its backward, as ``config.ddp`` runs it (see the module docstring)."""
    if config.dp == 1 or not schedule.backward:
        return schedule
    if config.ddp != "megatron-local":
        return DataParallel.schedule_for(schedule, config.dp, bucket_bytes=config.bucket_bytes,
                                         overlap=config.ddp == "overlap")
    grads, dtype = _grads(schedule.backward), config.dtype
    local = (Pointwise("ddp.flatten", 2 * grads, dtype),
             Collective("ddp.allreduce", "allreduce", "dp", config.dp, grads, dtype),
             Pointwise("ddp.scale", 2 * grads, dtype),
             Pointwise("ddp.copy_back", 2 * grads, dtype))
    return dataclasses.replace(schedule, backward=schedule.backward + local)


def core_saved_bytes(shape: GPTShape, micro_batch: int, tp: int) -> int:
    """What tpmpi's attention core keeps per block on the rank with the most query heads: the
    float32 log-sum-exp of each query row of its heads (``micro_batch x heads x seq``), what
    selective recomputation drops (see the module docstring)."""
    heads = max(s.n_q for s in head_partition(shape.n_head, shape.kv_heads, tp).shards)
    return micro_batch * heads * shape.seq * 4


def _memory(parts: GPTParts, shape: GPTShape, config: StepConfig) -> dict:
    """Bytes per GPU by kind (see the module docstring)."""
    e = resolve_dtype(config.dtype).itemsize
    params = parts.embedding.param_bytes + parts.n_layer * parts.block.param_bytes \
        + parts.head.param_bytes
    block, n = parts.block.saved_bytes, parts.n_layer
    rows = largest_block(config.micro_batch * shape.seq, config.tp) \
        if config.sequence_parallel else config.micro_batch * shape.seq
    lse = core_saved_bytes(shape, config.micro_batch, config.tp)
    activations = {"none": n * block, "selective": n * (block - lse),
                   "full": n * rows * shape.n_embd * e + block}[config.recompute]
    return {"parameters": params, "gradients": params,
            "optimizer": params // e * config.optimizer_bytes[1],
            "activations": activations + parts.embedding.saved_bytes,
            "dp_bucket": min(config.bucket_bytes, params) if config.dp > 1 else 0}


def _collective_rows(phases: Iterable[tuple[Breakdown, int]],
                     machine: Machine) -> list[dict]:
    """Each collective of the iteration: name, op, group, size, bytes, seconds, exposed
    seconds, times per iteration (and NCCL's algorithm, protocol and tier on a cluster)."""
    rows: dict[str, dict] = {}
    for priced, count in phases:
        for cost in priced.collectives:
            step = cost.step
            row = rows.setdefault(step.name, {
                "name": step.name, "op": step.op, "group": step.group, "size": step.size,
                "bytes": step.nbytes, "seconds": cost.seconds, "exposed_s": 0.0, "count": 0})
            row["exposed_s"] += cost.exposed_s * count
            row["count"] += count
            if isinstance(machine, ClusterMachine) and step.size > 1:
                choice = machine.choice(step)
                row.update(algorithm=choice.algorithm, protocol=choice.protocol,
                           tier=machine.tier(step))
    return [r for r in rows.values() if r["size"] > 1]


def predict_step(target: Target, shape: GPTShape, config: StepConfig) -> StepPrediction:
    """The predicted iteration of ``shape`` under ``config`` on ``target`` (a cluster preset or
    a calibrated cluster); ``refused`` says why a configuration cannot run (then only its
    memory is predicted)."""
    pred = StepPrediction(cluster=target.name, shape=shape, config=config)
    micro = config.micro_batches
    if micro is None:
        pred.refused = (f"global_batch={config.global_batch} is not a multiple of "
                        f"micro_batch x dp = {config.micro_batch * config.dp}")
        return pred
    peak = target.device.peak_flops(config.dtype)
    machine = machine_for(target, Placement(config.tp, config.dp, target.gpus_per_node))
    parts = gpt_parts(shape, config.micro_batch, config.tp, config.sequence_parallel,
                      config.dtype)
    pred.memory = _memory(parts, shape, config)
    capacity = target.device.memory_bytes
    if pred.mem_per_gpu_bytes > capacity:  # not priced: a refused configuration has no time
        pred.refused = (f"needs {pred.mem_per_gpu_bytes / 2**30:.1f} GiB per GPU, the "
                        f"{target.device.name} has {capacity / 2**30:.1f} GiB")
        return pred
    if not config.overlap:
        parts = GPTParts(_blocking(parts.embedding), _blocking(parts.block),
                         _blocking(parts.head), parts.n_layer)

    def cost(steps: Sequence[Step], backward: bool = False) -> Breakdown:
        return price(Schedule((), tuple(steps)) if backward else Schedule(tuple(steps)),
                     machine, backward=backward)
    fwd, bwd = cost(parts.block.forward), cost(parts.block.backward, True)
    recompute = cost(recomputed(parts.block, config.recompute))
    head_f, head_b = cost(parts.head.forward), cost(parts.head.backward, True)
    emb_f, emb_b = cost(parts.embedding.forward), cost(parts.embedding.backward, True)
    one = micro_batch_schedule(parts, config.recompute)
    plain = price(one, machine)
    last = price(with_data_parallel(one, config), machine)
    n = shape.n_layer
    pred.micro_batches = micro
    pred.layer_fwd_s, pred.layer_bwd_s, pred.layer_recompute_s = fwd.time_s, bwd.time_s, \
        recompute.time_s
    pred.layer = {
        phase: {"seconds": p.time_s, "products_s": p.product_s,
                "pointwise_s": p.compute_s - p.product_s, "collectives_s": p.comm_s}
        for phase, p in (("forward", fwd), ("backward", bwd), ("recompute", recompute))}
    pred.embedding_loss_s = emb_f.time_s + emb_b.time_s + head_f.time_s + head_b.time_s
    pred.micro_batch_s = plain.time_s
    pred.dp_allreduce_s = last.collective_s.get("dp", 0.0)
    pred.dp_exposed_s = last.time_s - plain.time_s
    e = resolve_dtype(config.dtype).itemsize
    params = _grads(one.backward)
    optimizer = Schedule((Pointwise("optimizer.adam", params // e * config.optimizer_bytes[0],
                                    "float32"),
                          Collective("optimizer.grad_norm", "allreduce", "tp", config.tp, 4,
                                     "float32")))
    opt = price(optimizer, machine, backward=False)
    pred.optimizer_s = opt.time_s
    pred.iteration_s = (micro - 1) * pred.micro_batch_s + last.time_s + pred.optimizer_s
    pred.flops = model_flops(shape, config.global_batch, config.recompute)
    pred.tflops_per_gpu = pred.flops / pred.iteration_s / pred.gpus / 1e12
    pred.mfu = pred.tflops_per_gpu * 1e12 / peak
    phases = [(fwd, n * micro), (bwd, n * micro), (recompute, n * micro), (head_f, micro),
              (head_b, micro), (emb_f, micro), (emb_b, micro), (opt, 1)]
    pred.collectives = _collective_rows(phases, machine)
    if config.dp > 1:
        pred.collectives.append({
            "name": "dp.grads", "op": "allreduce", "group": "dp", "size": config.dp,
            "bytes": params, "seconds": pred.dp_allreduce_s, "exposed_s": pred.dp_exposed_s,
            "count": 1, "ddp": config.ddp})
    return pred
