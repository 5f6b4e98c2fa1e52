"""Cost model of hybrid parallelism (serial): the DP gradient Allreduce and its buckets hidden
under backward, sequence parallelism's bytes and memory, the tile2d FFN, plan over every
dp x tp factorisation and its explanation."""
import pytest

from tpmpi.studies.costmodel import Calibration, candidates, explain, plan, predict
from tpmpi.studies.schemes import Problem

BETA = 1e-9  # s/byte, no latency: times are bytes x factor x BETA
CAL = Calibration(alpha={op: {"2": 0.0} for op in ("allreduce", "allgather", "reduce_scatter")},
                  beta={op: {"2": BETA} for op in ("allreduce", "allgather", "reduce_scatter")})


def mlp(mode="megatron", backward=True, m=512, k=256, h=1024, **opts):
    options = dict(opts, **({"mode": mode} if mode != "megatron" else {}))
    return Problem(scheme="mlp", m=m, k=k, n=k, hidden=h, backward=backward,
                   options=tuple(sorted(options.items())))


def test_dp_allreduce_of_the_gradient_bytes():
    """column, K=N=1024, 2 TP ranks x 2 replicas: each rank all-reduces its (1024, 512) weight
    and (512,) bias gradients over 2 ranks: 2 (2-1)/2 S beta, all exposed (one layer)."""
    prob = Problem(scheme="column", m=256, k=1024, n=1024, backward=True)
    pred = predict(prob, 4, calibration=CAL, dp=2)
    grads = (1024 * 512 + 512) * 4
    assert pred.dp == 2 and pred.grid == (1, 2) and pred.label == "column 1x2 dp=2"
    assert pred.dp_allreduce_s == pytest.approx(grads * BETA)
    assert pred.dp_comm_s == pytest.approx(pred.dp_allreduce_s)
    assert pred.tp_comm_s == pytest.approx(pred.comm_s - pred.dp_comm_s)
    tp_only = predict(Problem(scheme="column", m=128, k=1024, n=1024, backward=True), 2,
                      calibration=CAL)  # one replica's rows on its own
    assert pred.compute_s == pytest.approx(tp_only.compute_s)
    assert pred.bytes_per_rank == pytest.approx(tp_only.bytes_per_rank + grads)


def test_forward_only_has_no_dp_traffic():
    pred = predict(mlp(backward=False), 4, calibration=CAL, dp=4)
    assert pred.dp_comm_s == pred.dp_allreduce_s == 0 and pred.comm_s == 0


def test_small_buckets_hide_fc2_gradients_under_fc1_backward():
    big = predict(mlp(), 4, calibration=CAL, dp=2)
    small = predict(mlp(), 4, calibration=CAL, dp=2, bucket_bytes=1)
    blocking = predict(mlp(overlap=False), 4, calibration=CAL, dp=2, bucket_bytes=1)
    assert big.dp_allreduce_s == pytest.approx(small.dp_allreduce_s)
    assert big.dp_comm_s == pytest.approx(big.dp_allreduce_s)  # one bucket, ready at the end
    fc1_grads = (256 * 512 + 512) * 4  # fc1's bucket (the last) stays exposed
    assert small.dp_comm_s == pytest.approx(fc1_grads * BETA)
    assert blocking.dp_comm_s == pytest.approx(blocking.dp_allreduce_s)


def test_sequence_parallel_bytes_and_memory():
    """SP moves AG + RS (= one ring AR) where Megatron all-reduces, plus the re-gather of X in
    backward; the block's input and output take 1/P of the rows."""
    m, k, p, b = 512, 256, 4, 4
    meg = predict(mlp(), p, calibration=CAL)
    seq = predict(mlp("sequence"), p, calibration=CAL)
    f = (p - 1) / p
    assert meg.bytes_per_rank == pytest.approx(2 * f * (m * k + m * k) * b)
    assert seq.bytes_per_rank == pytest.approx(f * 5 * m * k * b)
    assert meg.mem_bytes - seq.mem_bytes == pytest.approx(2 * (m - m // p) * k * b)
    assert seq.compute_s == pytest.approx(meg.compute_s)


def test_tile2d_ffn_and_default_grids():
    pred = predict(mlp("tile2d"), 4, calibration=CAL)
    assert pred.grid == (2, 2) and pred.comm_s > 0
    assert predict(mlp("tile2d"), 4, (1, 4), calibration=CAL).grid == (1, 4)
    assert predict(mlp("tile2d"), 4, calibration=CAL, dp=2).grid == (1, 2)


def test_plan_ranks_every_factorisation_and_explains():
    labels = {p.label for p in plan(512, 256, 256, 4, hidden=1024, backward=True)}
    assert labels == {"mlp 1x4", "mlp 1x4 mode=book", "mlp 1x4 mode=sequence",
                      "mlp 1x4 mode=tile2d", "mlp 2x2 mode=tile2d", "mlp 4x1 mode=tile2d",
                      "mlp 1x2 dp=2", "mlp 1x2 dp=2 mode=book", "mlp 1x2 dp=2 mode=sequence",
                      "mlp 1x2 dp=2 mode=tile2d", "mlp 2x1 dp=2 mode=tile2d", "mlp 1x1 dp=4"}
    single = list(candidates(64, 256, 256, 4))
    assert {dp for *_, dp in single} == {1, 2, 4}
    assert [c for c in single if c[3] == 4] == [("column", (1, 1), {}, 4)]
    # DP wins when the gradient Allreduce is cheap next to TP's activation traffic and half of
    # it hides under fc1's backward (per-gradient buckets)
    cheap_dp = plan(8192, 256, 256, 4, hidden=1024, backward=True, calibration=CAL,
                    bucket_bytes=1)
    assert cheap_dp[0].label == "mlp 1x1 dp=4"
    assert 0 < cheap_dp[0].dp_comm_s < cheap_dp[0].dp_allreduce_s
    text = explain(cheap_dp)
    assert text.startswith(f"why {cheap_dp[0].label} first: ")
    assert "runner-up" in text and "best with dp=1" in text and "most on" in text
    # and TP wins when the weights are large next to the activations
    big_weights = plan(16, 4096, 4096, 4, hidden=16384, backward=True, calibration=CAL)
    assert big_weights[0].dp == 1
    assert "best with dp>1" in explain(big_weights)
