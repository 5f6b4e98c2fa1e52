"""Cost model (serial): formulas, fitting, calibration files, plan; predictions priced from the
layers' schedules (the overlap setting as the layers run it, a new composite priced with no
change to the model, the half-precision exchange's own fit); hybrid parallelism (the DP
gradient Allreduce and its buckets hidden under backward, sequence parallelism's bytes and
memory, the tile2d FFN, plan over every dp x tp factorisation and its explanation); pinned
predictions of a synthetic calibration."""
import json

import pytest

from tpmpi.core.colltable import bw_factor, lat_factor
from tpmpi.core.schedule import Product
from tpmpi.studies.costmodel import (Calibration, CalibratedMachine, calibration_key, candidates,
                                     explain, fit_alpha_beta, gemm_class, load_calibration, plan,
                                     predict, schedule_of, square_grid)
from tpmpi.studies.footprint import bytes_per_rank
from tpmpi.studies.pricing import price
from tpmpi.studies.schemes import Problem


def test_ring_factors_match_algorithms_md():
    assert lat_factor("allgather", 4) == 3 and bw_factor("allgather", 4) == 0.75
    assert lat_factor("allreduce", 4) == 6 and bw_factor("allreduce", 4) == 1.5
    assert lat_factor("bcast", 8) == 3
    assert lat_factor("allreduce", 1) == 0 == bw_factor("allreduce", 1)


def test_fit_recovers_alpha_beta():
    alpha, beta = 3e-6, 2e-10
    sizes = [2 ** i for i in range(3, 24, 2)]
    times = [lat_factor("allgather", 4) * alpha + bw_factor("allgather", 4) * s * beta
             for s in sizes]
    a, b = fit_alpha_beta("allgather", 4, sizes, times)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)


def test_fit_is_non_negative():
    a, b = fit_alpha_beta("allreduce", 2, [8, 16, 32], [3e-6, 2e-6, 1e-6])
    assert a >= 0 and b >= 0


def test_collective_uses_nearest_fitted_size():
    cal = Calibration(alpha={"allgather": {"2": 1e-6, "8": 9e-6}},
                      beta={"allgather": {"2": 0.0, "8": 0.0}})
    assert cal.collective("allgather", 3, 100) == pytest.approx(2 * 1e-6)
    assert cal.collective("allgather", 7, 100) == pytest.approx(6 * 9e-6)
    assert cal.collective("allgather", 1, 1e9) == 0.0


@pytest.mark.parametrize("scheme", ["column", "row", "mlp", "tile2d"])
@pytest.mark.parametrize("backward", [False, True])
def test_predict_every_scheme(scheme, backward):
    prob = Problem(scheme=scheme, m=512, k=1024, n=1024, hidden=2048, backward=backward)
    pred = predict(prob, 4)
    assert pred.time_s == pytest.approx(pred.compute_s + pred.comm_s)
    assert pred.compute_s > 0 and pred.comm_s > 0 and pred.bytes_per_rank > 0
    assert pred.mem_bytes > 0
    one = predict(prob, 1)
    assert one.comm_s == 0 and one.bytes_per_rank == 0
    assert one.compute_s > pred.compute_s


def test_predict_unknown_scheme_is_none():
    assert predict(Problem(scheme="nope"), 2) is None


def test_tile2d_panel_bounds_memory_and_column_bytes():
    base = Problem(scheme="tile2d", m=1024, k=4096, n=1024)
    gather = predict(base, 4, (2, 2))
    panel = predict(Problem(scheme="tile2d", m=1024, k=4096, n=1024,
                            options=(("panel", 256),)), 4, (2, 2))
    assert panel.mem_bytes < gather.mem_bytes
    col = predict(Problem(scheme="column", m=1024, k=4096, n=1024), 4)
    assert col.bytes_per_rank == pytest.approx(0.75 * 1024 * 1024 * 4)  # (P-1)/P M N b


def test_chunks_hide_communication():
    cal = Calibration(alpha={"allgather": {"4": 0.0}}, beta={"allgather": {"4": 1e-9}})
    one = predict(Problem(scheme="column", m=4096, k=4096, n=4096), 4, calibration=cal)
    four = predict(Problem(scheme="column", m=4096, k=4096, n=4096,
                           options=(("chunks", 4),)), 4, calibration=cal)
    assert four.comm_s < one.comm_s


def test_plan_ranks_by_time_and_covers_layouts():
    preds = plan(256, 1024, 1024, 4)
    times = [p.time_s for p in preds]
    assert times == sorted(times)
    labels = {p.label for p in preds}
    assert {"column 1x4", "row 1x4", "tile2d 2x2"} <= labels
    assert any("panel=" in lbl for lbl in labels) and any("chunks=" in lbl for lbl in labels)
    ffn = plan(256, 1024, 1024, 4, hidden=4096)
    assert {p.scheme for p in ffn} == {"mlp"}


def test_calibration_roundtrip_and_env(tmp_path, monkeypatch):
    cal = Calibration(alpha={"allreduce": {"2": 1e-6}}, beta={"allreduce": {"2": 1e-10}},
                      machine={"ranks": 2})
    cal.rates["numpy:float32"]["large"] = 1e11
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cal.to_json()))
    back = load_calibration(str(path))
    assert back.collective("allreduce", 2, 1e6) == cal.collective("allreduce", 2, 1e6)
    assert back.gemm(2048, 2048, 2048, "float32") == pytest.approx(2 * 2048 ** 3 / 1e11)
    monkeypatch.setenv("TPMPI_CALIBRATION", str(path))
    assert load_calibration().machine == {"ranks": 2}
    monkeypatch.delenv("TPMPI_CALIBRATION")
    assert load_calibration().machine["source"] == "defaults"
    with pytest.raises(ValueError, match="calibration"):
        load_calibration(str(tmp_path / "missing.json"))


def test_helpers():
    assert gemm_class(8, 4096, 4096) == "thin"
    assert gemm_class(2048, 2048, 2048) == "large"
    assert square_grid(8) == (2, 4) and square_grid(7) == (1, 7)


# ------------------------------------------------------------------ hybrid parallelism

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
    backward; the memory is the footprint's (the block's input and output take 1/P of the
    rows, the gathered copies of x and dy come on top)."""
    m, k, p, b = 512, 256, 4, 4
    meg = predict(mlp(), p, calibration=CAL)
    seq = predict(mlp("sequence"), p, calibration=CAL)
    f = (p - 1) / p
    assert meg.bytes_per_rank == pytest.approx(2 * f * (m * k + m * k) * b)
    assert seq.bytes_per_rank == pytest.approx(f * 5 * m * k * b)
    assert seq.mem_bytes == bytes_per_rank(mlp("sequence"), (1, p))
    assert meg.mem_bytes == bytes_per_rank(mlp(), (1, p))
    flops = [sum(s.flops for s in schedule_of(prob, (1, p)).steps() if isinstance(s, Product))
             for prob in (mlp(), mlp("sequence"))]
    assert flops[0] == flops[1]
    assert seq.compute_s < meg.compute_s  # fc2's bias is added to this rank's rows only


@pytest.mark.parametrize("scheme,hidden_op", [("column", "allreduce"), ("row", "allgather"),
                                              ("mlp", "allreduce")])
def test_no_overlap_exposes_the_backward_collective_as_the_layers_run_it(scheme, hidden_op):
    """Overlapped, the dX collective hides behind the dW product (here entirely: the product is
    slower); with overlap=False the layer runs it blocking after the product, and the
    prediction grows by its whole time."""
    kw = dict(m=512, k=256, n=256, backward=True, hidden=1024 if scheme == "mlp" else None)
    on = predict(Problem(scheme=scheme, **kw), 2, calibration=CAL)
    off = predict(Problem(scheme=scheme, options=(("overlap", False),), **kw), 2,
                  calibration=CAL)
    dx = CAL.collective(hidden_op, 2, 512 * 256 * 4)
    assert off.compute_s == on.compute_s
    assert off.time_s - on.time_s == pytest.approx(dx, rel=1e-9)
    hidden = kw["hidden"]
    planned = {overlap: {p.label.replace(" overlap=False", ""): p.time_s
                         for p in plan(512, 256, 256, 2, hidden=hidden, backward=True,
                                       calibration=CAL, overlap=overlap)}
               for overlap in (True, False)}
    label = f"{scheme} 1x2"
    assert planned[False][label] == pytest.approx(off.time_s)
    assert planned[True][label] == pytest.approx(on.time_s)


def test_a_new_composite_is_priced_without_touching_the_model():
    """A composite of existing layers lists its schedule from theirs; the same pricer and
    machine price it: two column layers cost the sum of the two, and their backward's dX
    Allreduces hide behind the dW products as each layer's does."""
    from tpmpi.core.schedule import chain
    from tpmpi.layers import ColumnParallelLinear, Composite

    class TwoColumns(Composite):
        @classmethod
        def schedule_for(cls, m, k, n, parts, **kw):
            return chain([ColumnParallelLinear.schedule_for(m, k, n, parts, **kw).prefixed("a"),
                          ColumnParallelLinear.schedule_for(m, n, n, parts, **kw).prefixed("b")])

    machine = CalibratedMachine(CAL)
    both = price(TwoColumns.schedule_for(64, 128, 256, 2, backward=True), machine)
    a = predict(Problem(scheme="column", m=64, k=128, n=256, backward=True), 2, calibration=CAL)
    b = predict(Problem(scheme="column", m=64, k=256, n=256, backward=True), 2, calibration=CAL)
    assert both.time_s == pytest.approx(a.time_s + b.time_s)
    assert both.sent_bytes == pytest.approx(a.bytes_per_rank + b.bytes_per_rank)


def test_half_precision_reductions_take_their_own_fit():
    """2-byte floats are reduced by the exchange of slices: the calibration's fit of that path
    prices them, a missing one falls back to the plain collective's."""
    assert calibration_key("allreduce", "bfloat16") == "allreduce.exchange"
    assert calibration_key("allgather", "float16") == "allgather"
    assert calibration_key("reduce", "float32") == "reduce"
    slow = Calibration(alpha={"allreduce": {"2": 0.0}, "allreduce.exchange": {"2": 0.0}},
                       beta={"allreduce": {"2": 1e-9}, "allreduce.exchange": {"2": 3e-9}})
    prob = Problem(scheme="row", m=64, k=64, n=64, dtype="float16")
    sched = schedule_of(prob, (1, 2))
    fp16 = price(sched, CalibratedMachine(slow)).collective_s["tp"]
    plain = price(sched, CalibratedMachine(CAL)).collective_s["tp"]
    assert fp16 == pytest.approx(3 * plain)
    assert predict(prob, 2, calibration=CAL).comm_s == pytest.approx(plain)


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


# ------------------------------------------------------------------ pinned predictions
# Predictions of a synthetic calibration, recorded when the model came to price the layers' own
# schedules (element-wise work counted, the overlap each layer runs, the tile layer's bias
# Allreduce, memory from the footprint): a change of any schedule, overlap rule, machine
# formula, staging or DP bucket shows up here. Regenerate only for an intended change of the
# model, and say so.


def _synthetic() -> Calibration:
    ops = ("allgather", "reduce_scatter", "allreduce", "bcast")
    cal = Calibration(
        alpha={op: {"2": 3e-6 * (i + 1), "4": 4e-6 * (i + 1)} for i, op in enumerate(ops)},
        beta={op: {"2": 1e-10 * (i + 2), "4": 1.5e-10 * (i + 2)} for i, op in enumerate(ops)},
        staging={"d2h": 12e9, "h2d": 9e9})
    cal.rates["numpy:float32"] = {"thin": 9e9, "small": 40e9, "medium": 80e9, "large": 100e9}
    cal.rates["cupy:float16"] = {"thin": 1e12, "small": 40e12, "medium": 200e12, "large": 400e12}
    return cal


PINNED_CASES = [
    ("column", dict(m=512, k=1024, n=1000), {}, 4, None, {}),
    ("column", dict(m=4096, k=1024, n=1024, backward=True), {"chunks": 4}, 4, None, {}),
    ("row", dict(m=300, k=1000, n=700, backward=True), {}, 3, None, {}),
    ("tile2d", dict(m=1024, k=4096, n=1024, backward=True), {}, 4, (2, 2), {}),
    ("tile2d", dict(m=1024, k=4096, n=1024), {"panel": 256}, 4, (2, 2), {}),
    ("mlp", dict(m=512, k=256, n=256, hidden=1024, backward=True), {}, 4, None,
     {"dp": 2, "bucket_bytes": 2**18}),
    ("mlp", dict(m=512, k=256, n=256, hidden=1024, backward=True), {"mode": "book"}, 4, None, {}),
    ("mlp", dict(m=512, k=256, n=256, hidden=1024, backward=True),
     {"mode": "sequence", "overlap": False}, 2, None, {}),
    ("mlp", dict(m=512, k=256, n=256, backward=True), {"mode": "tile2d"}, 4, (2, 2), {}),
    ("column", dict(m=8, k=4096, n=4096, backward=True), {}, 4, None,
     {"oversubscription": 2.0, "dp": 2}),
    ("column", dict(m=2048, k=8192, n=8192, dtype="float16", backward=True), {}, 4, None,
     {"backend": "cupy", "staged": True, "oversubscription": 4.0}),
    ("mlp", dict(m=4096, k=2048, n=2048, dtype="float16", backward=True), {"mode": "sequence"},
     4, None, {"backend": "cupy", "staged": True}),
]
FIELDS = ("time_s", "compute_s", "comm_s", "bytes_per_rank", "mem_bytes", "dp_comm_s",
          "dp_allreduce_s")
PINNED = [
    ('column 1x4',
     (0.0038633777777777774, 0.0033905777777777776, 0.0004727999999999998, 1536000.0, 7779304.0,
      0.0, 0.0)),
    ('column 1x4 chunks=4',
     (0.08292880711111111, 0.08192885191111111, 0.0009999551999999995, 37748736.0, 90179584.0, 0.0,
      0.0)),
    ('row 1x3',
     (0.0060248111111111105, 0.005540811111111111, 0.0004839999999999992, 1920000.0, 6757600.0,
      0.0, 0.0)),
    ('tile2d 2x2',
     (0.0838472216888889, 0.0808803896888889, 0.0029668320000000026, 16779264.0, 39849984.0, 0.0,
      0.0)),
    ('tile2d 2x2 panel=256',
     (0.03321725582222223, 0.03266896782222223, 0.0005482880000000009, 8388608.0, 15730688.0, 0.0,
      0.0)),
    ('mlp 1x2 dp=2',
     (0.010971478044444444, 0.010620086044444444, 0.0003513920000000007, 1575936.0, 5511168.0,
      0.00022853440000000086, 0.00045665920000000006)),
    ('mlp 1x4 mode=book',
     (0.012330956799999999, 0.011450009599999998, 0.0008809472000000009, 5898240.0, 12716544.0,
      0.0, 0.0)),
    ('mlp 1x2 mode=sequence,overlap=False',
     (0.01145081973333333, 0.011115246933333331, 0.00033557279999999953, 1310720.0, 10229760.0, 0.0,
      0.0)),
    ('mlp 2x2 mode=tile2d',
     (0.011030578488888889, 0.010576338488888889, 0.00045423999999999985, 2361856.0, 6165504.0,
      0.0, 0.0)),
    ('column 1x2 dp=2',
     (0.03591142631111111, 0.022458823111111113, 0.0134526032, 33660928.0, 67485696.0,
      0.0134430496, 0.013443049600000001)),
    ('column 1x4',
     (0.053595186293191106, 0.00216226398208, 0.05143292231111111, 75497472.0, 243277824.0, 0.0,
      0.0)),
    ('mlp 1x4 mode=sequence',
     (0.027893604530631118, 0.0006747878195200001, 0.027218816711111118, 62914560.0, 205537280.0,
      0.0, 0.0)),
]
PINNED_PLANS = [
    ((256, 1024, 1024, 4, {}),
     ['column 1x4 chunks=8', 'column 1x1 dp=4', 'column 1x2 dp=2', 'tile2d 1x2 dp=2', 'column 1x4',
      'tile2d 1x4', 'tile2d 2x2', 'row 1x2 dp=2', 'column 1x4 chunks=4', 'tile2d 2x1 dp=2',
      'column 1x2 dp=2 chunks=2', 'column 1x2 dp=2 chunks=4', 'column 1x2 dp=2 chunks=8',
      'tile2d 4x1', 'row 1x4', 'column 1x4 chunks=2', 'tile2d 1x2 dp=2 panel=256',
      'tile2d 1x4 panel=256', 'tile2d 2x2 panel=256', 'tile2d 2x1 dp=2 panel=256',
      'tile2d 1x2 dp=2 panel=64', 'tile2d 1x4 panel=64', 'tile2d 2x2 panel=64',
      'tile2d 2x1 dp=2 panel=64', 'tile2d 4x1 panel=64', 'tile2d 4x1 panel=256']),
    ((64, 512, 512, 4, {'hidden': 2048, 'backward': True}),
     ['mlp 2x2 mode=tile2d', 'mlp 1x2 dp=2 mode=sequence', 'mlp 1x2 dp=2',
      'mlp 1x2 dp=2 mode=tile2d', 'mlp 1x2 dp=2 mode=book', 'mlp 1x4 mode=sequence',
      'mlp 1x4 mode=tile2d', 'mlp 1x4', 'mlp 1x4 mode=book', 'mlp 2x1 dp=2 mode=tile2d',
      'mlp 4x1 mode=tile2d', 'mlp 1x1 dp=4']),
]


@pytest.mark.parametrize("case,pinned", list(zip(PINNED_CASES, PINNED)),
                         ids=[label for label, _ in PINNED])
def test_predictions_are_pinned(case, pinned):
    scheme, dims, opts, ranks, grid, kw = case
    prob = Problem(scheme=scheme, options=tuple(sorted(opts.items())), **dims)
    pred = predict(prob, ranks, grid, _synthetic(), **kw)
    assert pred.label == pinned[0]
    assert tuple(getattr(pred, f) for f in FIELDS) == pytest.approx(pinned[1], rel=1e-12,
                                                                      abs=1e-18)


@pytest.mark.parametrize("args,labels", PINNED_PLANS)
def test_plan_order_is_pinned(args, labels):
    m, k, n, ranks, kw = args
    assert [p.label for p in plan(m, k, n, ranks, calibration=_synthetic(), **kw)] == labels
