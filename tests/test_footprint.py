"""tpmpi.studies.footprint: the arrays a run holds, from the layouts its layers declare."""
import pytest

from tpmpi.studies.footprint import bytes_per_rank
from tpmpi.studies.problem import Problem

M, K, N, H = 8, 6, 10, 10


def fixed_size(scheme, backward, **options):
    """The Problem of ``scheme`` at the sizes the cases below count by hand."""
    n = K if scheme == "mlp" else N
    return Problem(scheme=scheme, m=M, k=K, n=n, hidden=H if scheme == "mlp" else None,
                   backward=backward, options=tuple(sorted(options.items())))


# Elements on rank (0, 0), listed by hand (M=8, K=6, N=10, d_hidden=10; 4 ranks: blocks of 6
# are 2,2,1,1, blocks of 10 are 3,3,2,2, blocks of 8 are 2,2,2,2; a 2x2 grid halves each axis).
CASES = [
    # column, 1x4: x 8x6, the layer's copy of x 8x6, W 6x3, b 3, local product 8x3, gathered y
    # 8x10 | dy 8x10, dX (the partial sums, all-reduced in place) 8x6, dW 6x3, db 3
    ("column", {}, (1, 4), 48 + 48 + 18 + 3 + 24 + 80, 80 + 48 + 18 + 3),
    # row, 1x4: x 8x6, the layer's copy of its column block 8x2, W 2x10, b 10, y 8x10 (summed
    # in place) | dy 8x10, dX block 8x2, gathered dX 8x6, dW 2x10, db 10
    ("row", {}, (1, 4), 48 + 16 + 20 + 10 + 80, 80 + 16 + 48 + 20 + 10),
    # tile2d, 2x2: x 4x3, its copy 4x3, W 3x5, b 5, y 4x5, the X row panel 4x6 and W column
    # panel 6x5 (kept for backward) | dy 4x5, dx 4x3, dW 3x5, db 5
    ("tile2d", {}, (2, 2), 12 + 12 + 15 + 5 + 20 + 24 + 30, 20 + 12 + 15 + 5),
    # the panel form (K panel 2): two slots of an X piece 4x2 and a W piece 2x5 instead
    ("tile2d", {"panel": 2}, (2, 2), 12 + 12 + 15 + 5 + 20 + 2 * (8 + 10),
     20 + 12 + 15 + 5),
    # mlp megatron, 1x4: x 8x6, fc1's copy of x 8x6, W1 6x3, b1 3, h 8x3, act(h) 8x3 (fc2 keeps
    # it, no copy), W2 3x6, b2 6, y 8x6 | dy 8x6, dh 8x3, dW2 3x6, db2 6, d(pre-activation)
    # 8x3, dX 8x6, dW1 6x3, db1 3
    ("mlp", {}, (1, 4), 48 + 48 + 18 + 3 + 24 + 24 + 18 + 6 + 48,
     48 + 24 + 18 + 6 + 24 + 48 + 18 + 3),
    # mlp sequence, 1x4: x rows 2x6, fc1's copy of them 2x6, x gathered 8x6, W1, b1, h, act(h),
    # W2, b2, fc2's partial sums 8x6, y rows 2x6 | dy rows 2x6, dy gathered 8x6, dh 8x3, dW2,
    # db2, d(pre) 8x3, x gathered again 8x6, dX partial sums 8x6, dX rows 2x6, dW1, db1
    ("mlp", {"mode": "sequence"}, (1, 4), 12 + 12 + 48 + 18 + 3 + 24 + 24 + 18 + 6 + 48 + 12,
     12 + 48 + 24 + 18 + 6 + 24 + 48 + 48 + 12 + 18 + 3),
]


@pytest.mark.parametrize("scheme,options,grid,forward,backward", CASES,
                         ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_arrays_of_the_step(scheme, options, grid, forward, backward):
    assert bytes_per_rank(fixed_size(scheme, False, **options), grid) == 4 * forward
    assert bytes_per_rank(fixed_size(scheme, True, **options), grid) == 4 * (forward + backward)


def test_dtype_and_unknown_scheme():
    p = fixed_size("column", False)
    assert bytes_per_rank(Problem(**{**p.__dict__, "dtype": "bfloat16"}), (1, 1)) * 2 == \
        bytes_per_rank(p, (1, 1))
    assert bytes_per_rank(Problem(scheme="diag"), (1, 1)) is None
