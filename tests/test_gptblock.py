"""tpmpi/studies/gptblock.py (the provisional GPT schedule, behind the signature of
GPT.schedule_for): the parameter count against the README's models, the saved activation bytes
against Korthikanti et al. 2022's formula, the products' FLOPs against the model's, and the
schedule's internal consistency (every overlapped step exists, gradients add up to the
parameters), uneven and zero-size shards included."""
import pytest

from tpmpi.core.schedule import Collective, GradsReady, Product
from tpmpi.studies.gptblock import GPTShape, schedule_for
from tpmpi.studies.trainstep import gpt_parts, model_flops, recomputed

README = [(24, 1920, 15, 1.16), (30, 2304, 18, 2.03), (36, 3072, 24, 4.24), (42, 4096, 32, 8.67)]


@pytest.mark.parametrize(("layers", "hidden", "heads", "billions"), README)
def test_parameters_match_the_published_model_sizes(layers, hidden, heads, billions):
    shape = GPTShape(layers, hidden, heads, 1024, 51200)
    h, v, s = hidden, 51200, 1024
    assert shape.params == 12 * layers * h * h + 13 * layers * h + v * h + s * h + 2 * h
    assert shape.params / 1e9 == pytest.approx(billions, abs=0.006)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_saved_bytes_are_korthikanti_s(tp, sp):
    """Half precision with dropout: s b h (10 + 24/t) + 5 a s^2 b / t per layer, all over t
    with sequence parallelism (Korthikanti et al. 2022, Table 2)."""
    s, b, h, a = 1024, 4, 4096, 32
    block = gpt_parts(GPTShape(2, h, a, s, 51200), b, tp, sp, "float16").block
    replicated = 34 / tp if sp else 10 + 24 / tp
    assert block.saved_bytes == pytest.approx(s * b * h * replicated + 5 * a * s * s * b / tp)


def test_the_attention_core_is_what_selective_recompute_reruns():
    block = gpt_parts(GPTShape(1, 1024, 16, 2048, 1000), 2, 2, False, "bfloat16").block
    assert [step.name for step in recomputed(block, "selective")] == [
        "attn.scores", "attn.softmax", "attn.dropout", "attn.context"]
    assert recomputed(block, "full") == block.forward and recomputed(block, "none") == ()


def test_the_signature_is_the_model_s_and_forward_only_leaves_backward_out():
    cfg = GPTShape(2, 64, 4, 16, 100).config()
    both = schedule_for(cfg, batch=2, seq=16, tp=2)
    fwd = schedule_for(cfg, batch=2, seq=16, tp=2, backward=False)
    assert fwd.forward == both.forward and fwd.backward == () and both.backward
    with pytest.raises(ValueError, match=r"seq=17: expected at most block_size=16"):
        schedule_for(cfg, batch=2, seq=17, tp=2)
    with pytest.raises(ValueError, match=r"tp=0: expected a positive integer"):
        schedule_for(cfg, batch=2, seq=16, tp=0)


@pytest.mark.parametrize(("tp", "kv"), [(1, 2), (2, 2), (4, None), (8, 8)])
def test_products_are_the_model_s_flops(tp, kv):
    """Forward and backward of every block and of the LM head, on every rank of an even
    split: the model's FLOPs without recomputation (grouped-query heads included)."""
    shape = GPTShape(3, 512, 8, 256, 4096, n_kv_head=kv)
    sch = schedule_for(shape.config(), batch=2, seq=shape.seq, tp=tp, dtype="float32")
    flops = sum(step.flops for step in sch.steps() if isinstance(step, Product))
    assert flops * tp == pytest.approx(model_flops(shape, 2, "none"))


@pytest.mark.parametrize(("heads", "tp", "sp"), [(15, 4, False), (2, 4, True), (3, 8, False)])
def test_uneven_and_zero_size_shards_build_consistent_schedules(heads, tp, sp):
    """More ranks than heads, heads not a multiple of tp: the largest shard's schedule; every
    overlapped step exists in its phase, the gradients ready add up to the parameters, every
    TP collective has the group's size."""
    shape = GPTShape(2, 64 * heads, heads, 128, 1000)
    sch = gpt_parts(shape, 1, tp, sp, "bfloat16")
    for part in (sch.embedding, sch.block, sch.head):
        for phase in (part.forward, part.backward):
            names = {step.name for step in phase if not isinstance(step, GradsReady)}
            for step in phase:
                if isinstance(step, Collective):
                    assert set(step.during) <= names and step.size == tp
        ready = sum(step.nbytes for step in part.backward if isinstance(step, GradsReady))
        assert ready == part.param_bytes
    assert all(step.m >= 0 for step in sch.block.steps() if isinstance(step, Product))


def test_sequence_parallelism_replaces_all_reduces_with_gathers_and_reduce_scatters():
    shape = GPTShape(1, 256, 4, 64, 500)
    ops = {step.op for step in gpt_parts(shape, 2, 4, True, "float16").block.steps()
           if isinstance(step, Collective)}
    assert ops == {"allgather", "reduce_scatter"}
    ops = {step.op for step in gpt_parts(shape, 2, 4, False, "float16").block.steps()
           if isinstance(step, Collective)}
    assert ops == {"allreduce"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_layer": 0}, r"n_layer=0: expected a positive integer"),
    ({"n_embd": 100, "n_head": 3}, r"n_embd=100: expected a multiple of n_head=3"),
    ({"n_kv_head": 3}, r"n_kv_head=3: expected a divisor of n_head=4"),
    ({"n_kv_head": True}, r"n_kv_head=True: expected None or a positive integer"),
    ({"vocab": 2.0}, r"vocab=2.0: expected a positive integer"),
])
def test_bad_shapes_are_named(kwargs, message):
    args = {"n_layer": 2, "n_embd": 64, "n_head": 4, "seq": 16, "vocab": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        GPTShape(**args)
