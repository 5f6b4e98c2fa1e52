"""tpmpi.models.config: GPTConfig exactly as DESIGN's contract (positional sizes, keyword-only
options, n_kv_head None -> n_head), its local checks naming the argument, value and expectation,
and the state-dict names and shapes against nanoGPT's (written out here and in the independent
reference)."""
import dataclasses
import inspect

import pytest

import gpt_reference as ref
from tpmpi.models import GPTConfig, state_dict_shapes


def test_signature_is_the_contract():
    sig = inspect.signature(GPTConfig)
    assert list(sig.parameters) == ["vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                    "n_kv_head", "dropout", "bias"]
    kinds = {n: p.kind for n, p in sig.parameters.items()}
    assert all(kinds[n] is inspect.Parameter.KEYWORD_ONLY for n in ("n_kv_head", "dropout", "bias"))
    assert {n: p.default for n, p in sig.parameters.items() if n in ("n_kv_head", "dropout",
                                                                      "bias")} \
        == {"n_kv_head": None, "dropout": 0.0, "bias": True}
    with pytest.raises(TypeError):
        GPTConfig(65, 64, 4, 4, 128, 2)  # n_kv_head is keyword-only


def test_values_and_defaults():
    cfg = GPTConfig(65, 64, 4, 4, 128)
    assert (cfg.n_kv_head, cfg.dropout, cfg.bias, cfg.head_size) == (4, 0.0, True, 32)
    gqa = GPTConfig(65, 64, 4, 8, 128, n_kv_head=2, dropout=0.1, bias=False)
    assert (gqa.n_kv_head, gqa.dropout, gqa.bias, gqa.head_size) == (2, 0.1, False, 16)
    assert cfg == GPTConfig(65, 64, 4, 4, 128, n_kv_head=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_head = 2
    assert dataclasses.asdict(gqa)["n_kv_head"] == 2


@pytest.mark.parametrize("args,kwargs,match", [
    ((65, 64, 4, 3, 128), {}, r"n_embd=128: expected a multiple of n_head=3"),
    ((65, 64, 4, 6, 132), {"n_kv_head": 4}, r"n_kv_head=4: expected a divisor of n_head=6"),
    ((0, 64, 4, 4, 128), {}, r"vocab_size=0: expected a positive integer"),
    ((65, -1, 4, 4, 128), {}, r"block_size=-1: expected a positive integer"),
    ((65, 64, 0, 4, 128), {}, r"n_layer=0"),
    ((65, 64, 4, 0, 128), {}, r"n_head=0"),
    ((65, 64, 4, 4, 12.0), {}, r"n_embd=12.0: expected a positive integer"),
    ((65, 64, 4, 4, 128), {"n_kv_head": 0}, r"n_kv_head=0: expected None or a positive"),
    ((65, 64, 4, 4, 128), {"dropout": 1.0}, r"dropout=1.0: expected a number with 0 <="),
    ((65, 64, 4, 4, 128), {"dropout": -0.5}, r"dropout=-0.5"),
    ((65, 64, 4, 4, 128), {"bias": 1}, r"bias=1: expected True or False")])
def test_bad_configs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(*args, **kwargs)


def test_state_dict_names_and_shapes_are_nanogpts():
    cfg = GPTConfig(10, 8, 1, 2, 4, n_kv_head=1)
    assert list(state_dict_shapes(cfg).items()) == [
        ("transformer.wte.weight", (10, 4)), ("transformer.wpe.weight", (8, 4)),
        ("transformer.h.0.ln_1.weight", (4,)), ("transformer.h.0.ln_1.bias", (4,)),
        ("transformer.h.0.attn.c_attn.weight", (8, 4)),
        ("transformer.h.0.attn.c_attn.bias", (8,)),
        ("transformer.h.0.attn.c_proj.weight", (4, 4)),
        ("transformer.h.0.attn.c_proj.bias", (4,)),
        ("transformer.h.0.ln_2.weight", (4,)), ("transformer.h.0.ln_2.bias", (4,)),
        ("transformer.h.0.mlp.c_fc.weight", (16, 4)), ("transformer.h.0.mlp.c_fc.bias", (16,)),
        ("transformer.h.0.mlp.c_proj.weight", (4, 16)),
        ("transformer.h.0.mlp.c_proj.bias", (4,)),
        ("transformer.ln_f.weight", (4,)), ("transformer.ln_f.bias", (4,)),
        ("lm_head.weight", (10, 4))]


@pytest.mark.parametrize("n_head,n_kv_head,bias", [(4, None, True), (4, 1, False),
                                                   (6, 3, True), (8, 2, False)])
def test_state_dict_shapes_agree_with_the_independent_reference(n_head, n_kv_head, bias):
    cfg = GPTConfig(37, 16, 3, n_head, 4 * n_head, n_kv_head=n_kv_head, bias=bias)
    ours = state_dict_shapes(cfg)
    theirs = ref.shapes(37, 16, 3, n_head, 4 * n_head, cfg.n_kv_head, bias)
    assert list(ours.items()) == list(theirs.items())
    assert all(not k.endswith(".bias") for k in ours) or bias
