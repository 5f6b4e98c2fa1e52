"""tpmpi.core.dropout: any block of a mask, alone, is bit-identical to the same block of the whole
mask -- a rank's heads at TP 1-4 (GQA and uneven heads included), token shards under sequence
parallelism, the samples of a DP replica in any dp x tp mesh -- plus the keep rate, the
coordinates that change a mask, inverted scaling and argument errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tpmpi.core.dropout import DROPOUT_STREAM, Site, check_probability, keep_mask, keep_scale
from tpmpi.core.heads import head_partition
from tpmpi.core.init import philox_draws
from tpmpi.core.partition import block_partition

KEY = dict(seed=7, call=3, layer=2)


def whole(site, sample_shape, n_samples, p=0.3, **key):
    return keep_mask(p, **{**KEY, **key}, site=site, sample_shape=sample_shape,
                     samples=(0, n_samples))


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1), (6, 3), (3, 3), (1, 1)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_attention_masks_of_each_rank_equal_the_serial_mask(n_head, n_kv_head, tp):
    B, T = 3, 5
    full = whole(Site.ATTENTION, (n_head, T, T), B)
    parts = head_partition(n_head, n_kv_head, tp)
    out = np.zeros_like(full)
    for s in parts.shards:
        block = keep_mask(0.3, **KEY, site=Site.ATTENTION, sample_shape=(n_head, T, T),
                          samples=(0, B), block=[slice(*s.q_heads)])
        assert block.shape == (B, s.n_q, T, T)
        out[:, slice(*s.q_heads)] = block
        for h in range(*s.q_heads):  # one head at a time, as the attention kernel asks
            one = keep_mask(0.3, **KEY, site=Site.ATTENTION, sample_shape=(n_head, T, T),
                            samples=slice(1, B), block=[(h, h + 1)])
            assert np.array_equal(one, full[1:, h:h + 1])
    assert np.array_equal(out, full)


@pytest.mark.parametrize("dp,tp", [(1, 1), (1, 4), (2, 2), (4, 1), (3, 1), (1, 3)])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_hidden_masks_of_any_mesh_equal_the_serial_mask(dp, tp, sequence_parallel):
    """Replica r holds global samples r*B .. r*B+B-1; under SP each TP rank holds a token block."""
    B, T, d = 2, 7, 6
    full = whole(Site.MLP_OUTPUT, (T, d), dp * B)
    out = np.zeros_like(full)
    for r in range(dp):
        tokens = block_partition(T, tp) if sequence_parallel else [(0, T)] * tp
        for t0, t1 in tokens:
            block = keep_mask(0.3, **KEY, site=Site.MLP_OUTPUT, sample_shape=(T, d),
                              samples=(r * B, r * B + B), block=[(t0, t1)])
            assert block.shape == (B, t1 - t0, d)
            out[r * B:(r + 1) * B, t0:t1] = block
    assert np.array_equal(out, full)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers(1, 4), st.data())
def test_any_block_equals_the_slice_of_the_whole(sample_shape, n_samples, data):
    full = whole(Site.ATTENTION, sample_shape, n_samples, p=0.5)
    s0 = data.draw(st.integers(0, n_samples))
    s1 = data.draw(st.integers(s0, n_samples))
    spans = []
    for n in sample_shape[:data.draw(st.integers(0, len(sample_shape)))]:
        a = data.draw(st.integers(0, n))
        spans.append((a, data.draw(st.integers(a, n))))
    block = keep_mask(0.5, **KEY, site=Site.ATTENTION, sample_shape=sample_shape,
                      samples=(s0, s1), block=spans)
    index = (slice(s0, s1),) + tuple(slice(a, b) for a, b in spans)
    assert np.array_equal(block, full[index])


@pytest.mark.parametrize("samples", [(2, 3), (1, 2)])
def test_the_mask_is_the_documented_draw(samples):
    """Element e of sample s has index i = s*prod(sample_shape)+e: kept when 32-bit half i % 2
    (low first) of draw i // 2 of key (seed, DROPOUT_STREAM) in the counter range (call, layer,
    site), divided by 2**32, is >= p (rounded up to a multiple of 2**-32)."""
    p = 0.3
    s0, s1 = samples
    m = keep_mask(p, seed=9, call=1, layer=2, site=3, sample_shape=(5, 3), samples=samples)
    key = np.array([9, DROPOUT_STREAM], dtype=np.uint64)
    raw = philox_draws(key, 0, 8 * s1, base=(1 << 192) + (2 << 128) + (3 << 64))
    words = [(int(r) >> shift) & 0xFFFFFFFF for r in raw for shift in (0, 32)]
    want = [w >= np.ceil(p * 2**32) for w in words[15 * s0:15 * s1]]
    assert m.reshape(-1).tolist() == want


def test_extreme_rates():
    tiny = 2.0**-40  # below the 2**-32 resolution: keeps all but words equal to 0
    assert whole(Site.ATTENTION, (16, 16), 2, p=tiny).mean() > 0.999
    assert not whole(Site.ATTENTION, (4, 4), 2, p=1 - 2.0**-40).any()


def test_keep_rate_and_coordinates():
    m = whole(Site.ATTENTION, (64, 64), 64, p=0.3)
    assert abs(m.mean() - 0.7) < 0.005
    for other in ({"seed": 8}, {"call": 4}, {"layer": 3}):
        assert not np.array_equal(m, whole(Site.ATTENTION, (64, 64), 64, **other))
    assert not np.array_equal(m, whole(Site.EMBEDDING, (64, 64), 64))
    assert whole(Site.ATTENTION, (8, 8), 2, p=0.0).all()
    # a mask grows monotonically with 1 - p (the same draws)
    assert not np.any(whole(Site.ATTENTION, (64, 64), 4, p=0.6) & ~m[:4])


def test_keep_scale_is_inverted_dropout():
    keep = np.array([True, False, True])
    assert np.array_equal(keep_scale(keep, 0.2, np.float64), [1.25, 0.0, 1.25])
    s = keep_scale(keep, 0.1, np.float32)
    assert s.dtype == np.float32 and s[0] == np.float32(1 / 0.9)


@pytest.mark.parametrize("kwargs,match", [
    ({"p": 1.0}, r"p=1.0: expected a number with 0 <= p < 1"),
    ({"p": -0.1}, r"p=-0.1"), ({"p": True}, "p=True"),
    ({"seed": -1}, r"seed=-1: expected an integer in \[0, 2\*\*64\)"),
    ({"call": 2**64}, "call="), ({"layer": 1.5}, "layer=1.5"),
    ({"samples": (3, 2)}, r"samples=\(3, 2\): expected 0 <= start <= stop"),
    ({"samples": slice(0, None)}, "samples=slice"),
    ({"block": [(0, 5)]}, r"block=\(0, 5\): expected 0 <= start <= stop <= 4"),
    ({"block": [(0, 1)] * 3}, "expected at most 2 spans"),
    ({"sample_shape": (-1, 2)}, "sample_shape"),
    ({"samples": (0, 2**63)}, "fewer than 2\\*\\*66 elements")])
def test_bad_arguments(kwargs, match):
    args = dict(p=0.1, seed=0, call=0, layer=0, site=0, sample_shape=(4, 3), samples=(0, 2))
    with pytest.raises(ValueError, match=match):
        keep_mask(**{**args, **kwargs})


def test_check_probability_names_its_argument():
    assert check_probability(0) == 0.0 and check_probability(np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"dropout='0\.1': expected a number"):
        check_probability("0.1")


def test_gpu_mask_equals_the_host_mask(xb):
    m = keep_mask(0.4, **KEY, site=1, sample_shape=(3, 4), samples=(0, 2), backend=xb)
    assert isinstance(m, xb.xp.ndarray)
    assert np.array_equal(xb.to_host(m),
                          keep_mask(0.4, **KEY, site=1, sample_shape=(3, 4), samples=(0, 2)))
