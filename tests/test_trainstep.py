"""tpmpi/studies/trainstep.py: the composition (the GPT's one schedule taken apart and put back
together: without recomputation it is the model's schedule step for step, recomputation
inserts the block's forward before its backward, blocks that differ are refused), the data
parallelism it adds (buckets as DataParallel cuts them, Megatron's local DDP) priced by the one
pricer against hand computations; FLOPs against Narayanan et al.'s formulas and the README's
own TFLOP/s column; recomputation, gradient accumulation, memory and its refusal; the record's
contract fields. The GPT's schedule as the planner reads it: the products' FLOPs against the
model's, every overlapped step present, gradients ready = parameters, uneven and zero-size
shards, the collectives of sequence parallelism, what selective recomputation drops."""
import dataclasses

import pytest

from tpmpi.core.schedule import Collective, GradsReady, Pointwise, Product, Schedule
from tpmpi.layers.attention import ParallelAttention
from tpmpi.models import GPT
from tpmpi.studies.cluster import load_cluster
from tpmpi.studies.gptshape import GPTShape
from tpmpi.studies.pricing import price
from tpmpi.studies.trainstep import (GPT_SCHEDULE, StepConfig, core_saved_bytes, gpt_parts,
                                     micro_batch_schedule, model_flops, predict_step, recomputed,
                                     split_gpt, with_data_parallel)


class Stand:
    """A machine whose times are read off the steps: a product takes ``m`` seconds,
    element-wise work ``nbytes``, a collective ``nbytes / 10``."""

    def product_s(self, step):
        return float(step.m)

    def pointwise_s(self, step):
        return float(step.nbytes)

    def collective_s(self, step):
        return step.nbytes / 10


@pytest.mark.parametrize(("tp", "sp", "heads"), [(1, False, 4), (2, True, 4), (8, False, 3),
                                                 (4, True, 2)])
def test_the_composition_is_the_model_s_schedule(tp, sp, heads):
    """Without recomputation the composed micro-batch is GPT_SCHEDULE's schedule step for step
    (uneven and zero-size shards included): the composition describes nothing of the block."""
    shape = GPTShape(3, 32 * heads, heads, 16, 100)
    built = GPT_SCHEDULE(shape.config(), batch=2, seq=16, tp=tp, sequence_parallel=sp,
                         dtype="bfloat16")
    composed = micro_batch_schedule(gpt_parts(shape, 2, tp, sp, "bfloat16"))
    assert composed == built
    assert composed.saved_bytes == built.saved_bytes and composed.param_bytes == built.param_bytes


def test_recomputation_reruns_the_block_s_forward_before_its_backward():
    parts = gpt_parts(GPTShape(2, 64, 4, 16, 100), 1, 2, False, "float32")
    full = micro_batch_schedule(parts, "full")
    names = [getattr(s, "name", None) for s in full.backward]
    first = names.index("transformer.h.1.recompute.ln_1.forward")
    assert names[first:first + len(parts.block.forward)] == [
        f"transformer.h.1.recompute.{s.name}" for s in parts.block.forward]
    assert names[first + len(parts.block.forward)] == "transformer.h.1." + \
        parts.block.backward[0].name
    sel = [n for n in (getattr(s, "name", "") for s in micro_batch_schedule(parts, "selective")
                       .backward) if ".recompute." in n]
    assert sel == [f"transformer.h.{i}.recompute.attn.{what}" for i in (1, 0)
                   for what in ("scores", "softmax")]


def test_the_planner_s_schedule_is_the_model_s():
    assert GPT.schedule_for == GPT_SCHEDULE
    cfg = GPTShape(2, 64, 4, 16, 100).config()
    both = GPT_SCHEDULE(cfg, batch=2, seq=16, tp=2)
    fwd = GPT_SCHEDULE(cfg, batch=2, seq=16, tp=2, backward=False)
    assert fwd.forward == both.forward and fwd.backward == () and both.backward


def test_selective_recomputation_reruns_what_forms_the_log_sum_exp_and_drops_it():
    """tpmpi's attention core keeps no probabilities: selective recomputation reruns the scores
    product and the softmax (forming the per-row log-sum-exp) and saves that float32 row
    statistic, what the attention keeps beyond its input, q, k, v and context (3 heads on 2
    ranks: 2 on the largest shard; grouped-query heads)."""
    block = gpt_parts(GPTShape(1, 96, 3, 64, 1000, n_kv_head=3), 2, 2, False, "bfloat16").block
    assert [step.name for step in recomputed(block, "selective")] == ["attn.scores",
                                                                      "attn.softmax"]
    assert recomputed(block, "full") == block.forward and recomputed(block, "none") == ()
    b, s, h, e = 2, 64, 96, 2
    for heads, kv, tp, big_q, big_kv in [(3, 3, 2, 2, 2), (8, 2, 4, 2, 1), (4, 4, 8, 1, 1)]:
        attn = ParallelAttention.schedule_for(b, s, h, heads, tp, n_kv_head=kv, dropout=True,
                                              dtype="bfloat16", backward=True)
        hd = h // heads
        rest = b * s * h * e + b * s * (2 * big_q + 2 * big_kv) * hd * e
        lse = core_saved_bytes(GPTShape(1, h, heads, s, 1000, n_kv_head=kv), b, tp)
        assert lse == b * big_q * s * 4 == attn.saved_bytes - rest


@pytest.mark.parametrize(("tp", "kv"), [(1, 2), (2, 2), (4, None), (8, 8)])
def test_products_are_the_model_s_flops_and_the_recomputed_scores(tp, kv):
    """Forward and backward of every block and of the LM head, on every rank of an even
    split: the model's FLOPs without recomputation (grouped-query heads included) and the
    scores product that the attention's backward forms again (2 B s^2 h per block)."""
    shape = GPTShape(3, 512, 8, 256, 4096, n_kv_head=kv)
    sch = GPT_SCHEDULE(shape.config(), batch=2, seq=shape.seq, tp=tp, dtype="float32")
    flops = sum(step.flops for step in sch.steps() if isinstance(step, Product))
    again = shape.n_layer * 2.0 * 2 * shape.seq ** 2 * shape.n_embd
    assert flops * tp == pytest.approx(model_flops(shape, 2, "none") + again)
    assert model_flops(shape, 2, "selective") == pytest.approx(model_flops(shape, 2, "none")
                                                               + again)


@pytest.mark.parametrize(("heads", "tp", "sp"), [(15, 4, False), (2, 4, True), (3, 8, False),
                                                 (3, 8, True)])
def test_uneven_and_zero_size_shards_build_consistent_schedules(heads, tp, sp):
    """More ranks than heads, heads not a multiple of tp: the largest shard's schedule; every
    overlapped step exists in its phase, every TP collective has the group's size, the
    gradients ready add up to the parameters, in each part and in the whole."""
    shape = GPTShape(2, 64 * heads, heads, 128, 1000)
    whole = GPT_SCHEDULE(shape.config(), batch=1, seq=128, tp=tp, sequence_parallel=sp,
                         dtype="bfloat16")
    for phase in (whole.forward, whole.backward):
        names = {step.name for step in phase if not isinstance(step, GradsReady)}
        for step in phase:
            if isinstance(step, Collective):
                assert set(step.during) <= names and step.size == tp
    ready = sum(step.nbytes for step in whole.backward if isinstance(step, GradsReady))
    assert ready == whole.param_bytes > 0
    parts = gpt_parts(shape, 1, tp, sp, "bfloat16")
    assert parts.embedding.param_bytes + 2 * parts.block.param_bytes + \
        parts.head.param_bytes == whole.param_bytes
    assert all(step.m >= 0 for step in parts.block.steps() if isinstance(step, Product))
    if sp:  # nothing is final before the shares are summed
        tail = [getattr(step, "name", "") for step in whole.backward].index(
            "partial_grads.sum_shares")
        assert all(isinstance(step, GradsReady) for step in whole.backward[tail + 1:])


def test_sequence_parallelism_replaces_all_reduces_with_gathers_and_reduce_scatters():
    shape = GPTShape(1, 256, 4, 64, 500)
    ops = {step.op for step in gpt_parts(shape, 2, 4, True, "float16").block.steps()
           if isinstance(step, Collective)}
    assert ops == {"allgather", "reduce_scatter"}
    ops = {step.op for step in gpt_parts(shape, 2, 4, False, "float16").block.steps()
           if isinstance(step, Collective)}
    assert ops == {"allreduce"}


def test_blocks_that_differ_are_refused():
    shape = GPTShape(2, 64, 4, 16, 100)
    whole = GPT_SCHEDULE(shape.config(), batch=1, seq=16, tp=2)
    fwd = list(whole.forward)
    i = next(i for i, s in enumerate(fwd) if s.name == "transformer.h.1.ln_1.forward")
    fwd[i] = dataclasses.replace(fwd[i], nbytes=fwd[i].nbytes + 1)
    with pytest.raises(ValueError, match=r"block 1 does not run block 0's steps"):
        split_gpt(dataclasses.replace(whole, forward=tuple(fwd)), 2, 0)
    with pytest.raises(ValueError, match=r"forward runs blocks \[0, 1\], expected 0 .. 2"):
        split_gpt(whole, 3, 0)


BWD = Schedule((), (Product("a", 2, 1, 1, "float32"), GradsReady(("w1",), 10),
                    Product("b", 1, 1, 1, "float32"), GradsReady(("w2",), 10),
                    Pointwise("c", 4, "float32"), GradsReady(("w3",), 30)))


def test_dp_buckets_start_when_full_and_run_one_after_another():
    """Buckets of >= 20 bytes: w1+w2 ready at 3 s (2 s), w3 at 7 s (3 s): the first hides under
    c, the second runs past the end of backward (7 s) to 10 s: 3 s exposed of 5."""
    config = StepConfig(1, 4, 1, 4, bucket_bytes=20)
    last = price(with_data_parallel(BWD, config), Stand())
    assert (last.time_s, last.exposed_s["dp"], last.collective_s["dp"]) == (10, 3, 5)
    blocking = price(with_data_parallel(BWD, dataclasses.replace(config, ddp="blocking")),
                     Stand())
    assert (blocking.time_s, blocking.exposed_s["dp"]) == (12, 5)
    assert with_data_parallel(BWD, StepConfig(1, 1, 1, 1)) == BWD


def test_megatron_s_local_ddp_copies_all_reduces_once_and_scales():
    """Flatten (2 x 50 B), one all-reduce of 50 B (5 s), scale and copy back (2 x 50 B each)."""
    config = StepConfig(1, 4, 1, 4, ddp="megatron-local", dtype="float32")
    local = price(with_data_parallel(BWD, config), Stand())
    assert (local.time_s, local.exposed_s["dp"]) == (7 + 300 + 5, 5)
    assert [c.step.nbytes for c in local.collectives] == [50]


@pytest.mark.parametrize(("layers", "hidden", "heads"), [(24, 1920, 15), (42, 4096, 32)])
def test_flops_are_narayanan_s(layers, hidden, heads):
    b, s, v = 16, 1024, 51200
    shape = GPTShape(layers, hidden, heads, s, v)
    h, n = hidden, layers
    assert model_flops(shape, b, "full") == pytest.approx(
        96 * b * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h)))
    assert model_flops(shape, b, "none") == pytest.approx(
        72 * b * s * n * h * h * (1 + s / (6 * h) + v / (12 * n * h)))
    assert model_flops(shape, b, "selective") == pytest.approx(
        model_flops(shape, b, "none") + 2 * b * s * s * h * n)  # the scores product again


@pytest.mark.parametrize(("layers", "hidden", "heads", "gpus", "batch", "ms", "tflops"), [
    (24, 1920, 15, 1, 16, 1076, 149.8), (30, 2304, 18, 2, 16, 1026, 136.8),
    (36, 3072, 24, 4, 16, 1162, 124.7), (42, 4096, 32, 8, 16, 1343, 109.3),
    (24, 1920, 15, 1, 8, 1121, 71.9), (42, 4096, 32, 8, 8, 1407, 52.2),
    (42, 4096, 32, 1024, 2048, 1380, 106.5)])
def test_the_flop_convention_reproduces_the_readme_s_tflops_column(layers, hidden, heads, gpus,
                                                                   batch, ms, tflops):
    """The README's TFLOP/s per GPU are its iteration times under this convention (full
    recomputation counted)."""
    flops = model_flops(GPTShape(layers, hidden, heads, 1024, 51200), batch, "full")
    assert flops / (ms / 1e3) / gpus / 1e12 == pytest.approx(tflops, abs=0.1)


SHAPE = GPTShape(24, 2048, 16, 2048, 50304)


def _predict(**kwargs):
    args = {"tp": 4, "dp": 8, "micro_batch": 2, "global_batch": 64, **kwargs}
    return predict_step(load_cluster("dgx-a100"), SHAPE, StepConfig(**args))


def test_recomputation_trades_time_for_memory():
    none, sel, full = (_predict(recompute=r) for r in ("none", "selective", "full"))
    assert full.layer_recompute_s == pytest.approx(full.layer_fwd_s)
    assert 0 < sel.layer_recompute_s < full.layer_recompute_s
    assert none.layer_recompute_s == 0
    assert none.iteration_s < sel.iteration_s < full.iteration_s
    acts = [p.memory["activations"] for p in (none, sel, full)]
    assert acts[0] > acts[1] > acts[2]
    assert none.flops < sel.flops < full.flops


def test_gradient_accumulation_repeats_micro_batches_and_reduces_once():
    one, four = _predict(global_batch=16), _predict(global_batch=64)
    assert (one.micro_batches, four.micro_batches) == (1, 4)
    assert four.iteration_s == pytest.approx(4 * four.micro_batch_s + four.dp_exposed_s
                                             + four.optimizer_s)
    assert four.dp_allreduce_s == pytest.approx(one.dp_allreduce_s)
    assert four.micro_batch_s == pytest.approx(one.micro_batch_s)


def test_overlap_hides_collectives_and_the_dp_all_reduce():
    hidden, blocking = _predict(), _predict(overlap=False, ddp="blocking")
    assert hidden.layer["backward"]["collectives_s"] < blocking.layer["backward"]["collectives_s"]
    assert hidden.dp_exposed_s < hidden.dp_allreduce_s
    assert blocking.dp_exposed_s == pytest.approx(blocking.dp_allreduce_s)
    assert hidden.iteration_s < blocking.iteration_s


def test_memory_per_gpu_and_its_refusal():
    p = _predict(optimizer="adam", dtype="bfloat16")
    params = p.memory["parameters"]
    assert p.memory["gradients"] == params and p.memory["optimizer"] == 6 * params
    assert p.mem_per_gpu_bytes == sum(p.memory.values())
    big = predict_step(load_cluster("dgx-a100-40gb"), GPTShape(42, 4096, 32, 1024, 51200),
                       StepConfig(1, 1, 16, 16, dtype="float16"))
    assert big.refused.startswith("needs ") and "A100-SXM4-40GB has 40.0 GiB" in big.refused
    odd = _predict(global_batch=60)
    assert odd.refused == "global_batch=60 is not a multiple of micro_batch x dp = 16"
    assert odd.to_json()["iteration_s"] is None


def test_the_record_has_the_contract_fields():
    rec = _predict(sequence_parallel=True).to_json()
    for key in ("layer_fwd_s", "layer_bwd_s", "iteration_s", "tflops_per_gpu", "mfu",
                "mem_per_gpu_bytes"):
        assert isinstance(rec[key], (int, float)) and rec[key] > 0
    assert rec["mfu"] == pytest.approx(rec["tflops_per_gpu"] / 312)
    assert {c["name"] for c in rec["collectives"]} >= {"attn.reduce_y", "mlp.fc1.gather_x",
                                                       "dp.grads"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"recompute": "some"}, r"recompute='some': expected one of none, selective, full"),
    ({"optimizer": "apex-fp16", "dtype": "float32"},
     r"optimizer='apex-fp16': expected one of adam for dtype float32"),
    ({"dtype": "int8"}, r"dtype='int8': expected one of"),
    ({"ddp": "torch"}, r"ddp='torch': expected one of overlap, blocking, megatron-local"),
    ({"tp": 0}, r"tp=0: expected a positive integer"),
])
def test_bad_configurations_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepConfig(**{"tp": 1, "dp": 1, "micro_batch": 1, "global_batch": 1, **kwargs})


def test_a_dtype_the_device_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dtype='bfloat16': the V100-SXM3-32GB has no"):
        predict_step(load_cluster("dgx-2h"), SHAPE, StepConfig(1, 1, 1, 1))
