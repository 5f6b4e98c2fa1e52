"""tpmpi/studies/gptshape.py: the parameter count against the README's models, the config it
builds, bad shapes named. (What a rank runs for a shape, GPT.schedule_for, is tested in
test_trainstep.py and test_gpt.py; what a block keeps, in test_block.py.)"""
import math

import pytest

from tpmpi.models import state_dict_shapes
from tpmpi.studies.gptshape import GPTShape

README = [(24, 1920, 15, 1.16), (30, 2304, 18, 2.03), (36, 3072, 24, 4.24), (42, 4096, 32, 8.67)]


@pytest.mark.parametrize(("layers", "hidden", "heads", "billions"), README)
def test_parameters_match_the_published_model_sizes(layers, hidden, heads, billions):
    shape = GPTShape(layers, hidden, heads, 1024, 51200)
    h, v, s = hidden, 51200, 1024
    assert shape.params == 12 * layers * h * h + 13 * layers * h + v * h + s * h + 2 * h
    assert shape.params / 1e9 == pytest.approx(billions, abs=0.006)


def test_the_config_is_the_shape_s():
    cfg = GPTShape(3, 96, 6, 32, 500, n_kv_head=2, dropout=False, bias=False).config()
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.block_size,
            cfg.vocab_size, cfg.dropout, cfg.bias) == (3, 96, 6, 2, 32, 500, 0.0, False)
    assert GPTShape(1, 64, 4, 16, 100).config().dropout > 0


@pytest.mark.parametrize("kv", [None, 2])
def test_the_parameter_count_is_the_model_s_state_dict(kv):
    shape = GPTShape(2, 96, 6, 32, 500, n_kv_head=kv)
    """lm_head.weight is wte.weight (tied), counted once."""
    shapes = state_dict_shapes(shape.config())
    assert shapes["lm_head.weight"] == shapes["transformer.wte.weight"]
    assert shape.params == sum(math.prod(s) for k, s in shapes.items() if k != "lm_head.weight")


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
