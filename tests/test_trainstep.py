"""tpmpi/studies/trainstep.py: the pricing loop (overlap, gradients' readiness) and the DP
buckets against hand computations with a stand-in machine; FLOPs against Narayanan et al.'s
formulas and the README's own TFLOP/s column; recomputation, gradient accumulation, memory
and its refusal; the record's contract fields."""
import pytest

from tpmpi.core.schedule import Collective, GradsReady, Pointwise, Product
from tpmpi.studies.cluster import load_cluster
from tpmpi.studies.gptblock import GPTShape
from tpmpi.studies.trainstep import StepConfig, _dp_allreduce, model_flops, predict_step, price


class Stand:
    """A machine whose times are read off the steps: a product takes ``m`` seconds,
    element-wise work ``nbytes``, a collective ``nbytes / 10``."""

    def product_s(self, step):
        return float(step.m)

    def pointwise_s(self, step):
        return float(step.nbytes)

    def collective_s(self, step):
        return step.nbytes / 10


STEPS = [Product("a", 2, 1, 1, "float32"),
         Collective("c", "allreduce", "tp", 2, 30, "float32", during=("b",)),
         Product("b", 1, 1, 1, "float32"), GradsReady(("w",), 10),
         Pointwise("d", 4, "float32")]


def test_an_overlapped_collective_exposes_what_exceeds_its_steps():
    """a (2 s), then c (3 s) under b (1 s): 2 s exposed after b; gradients ready at 5 s."""
    p = price(STEPS, Stand())
    assert (p.seconds, p.product_s, p.pointwise_s, p.collective_s) == (9, 3, 4, 2)
    assert p.ready == [(5, 10)] and p.flops == 2 * (2 + 1)
    assert p.collectives == [(STEPS[1], 3, 2)]


def test_without_overlap_every_collective_blocks():
    p = price(STEPS, Stand(), overlap=False)
    assert (p.seconds, p.collective_s, p.ready) == (10, 3, [(6, 10)])


def test_dp_buckets_start_when_full_and_run_one_after_another():
    """Buckets of >= 20 bytes: (ready 2 s, 20 B) and (ready 5 s, 30 B), 2 s and 3 s each:
    done at 4 s and 8 s against a backward ending at 6 s: 2 s exposed of 5."""
    ready = [(1, 10), (2, 10), (5, 30)]
    config = StepConfig(1, 4, 1, 4, bucket_bytes=20)
    assert _dp_allreduce(ready, 6, Stand(), config) == (5, 2)
    config = StepConfig(1, 4, 1, 4, dp_overlap=False)
    assert _dp_allreduce(ready, 6, Stand(), config) == (5, 5)  # one all-reduce after backward
    assert _dp_allreduce(ready, 6, Stand(), StepConfig(1, 1, 1, 1)) == (0, 0)


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
        model_flops(shape, b, "none") + 4 * b * s * s * h * n)


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
    hidden, blocking = _predict(), _predict(overlap=False, dp_overlap=False)
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
    assert {c["name"] for c in rec["collectives"]} >= {"attn.reduce_y", "mlp.gather_x",
                                                       "dp.grads"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"recompute": "some"}, r"recompute='some': expected one of none, selective, full"),
    ({"optimizer": "apex-fp16", "dtype": "float32"},
     r"optimizer='apex-fp16': expected one of adam for dtype float32"),
    ({"dtype": "int8"}, r"dtype='int8': expected one of"),
    ({"tp": 0}, r"tp=0: expected a positive integer"),
])
def test_bad_configurations_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepConfig(**{"tp": 1, "dp": 1, "micro_batch": 1, "global_batch": 1, **kwargs})


def test_a_dtype_the_device_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dtype='bfloat16': the V100-SXM3-32GB has no"):
        predict_step(load_cluster("dgx-2h"), SHAPE, StepConfig(1, 1, 1, 1))
