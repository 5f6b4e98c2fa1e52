"""tpmpi/studies/transformer.py: the shape checks name the flag, model FLOPs follow Narayanan
et al. 2021 (and torch_tp_block.py's count for one block), the schedule is the layers' own,
the split sorts every step into one part and prices it on the machine."""
from pathlib import Path

import pytest

from tpmpi.core.schedule import Collective, Pointwise, Product
from tpmpi.layers.block import TransformerBlock
from tpmpi.studies import transformer
from tpmpi.studies.costmodel import Calibration, CalibratedMachine, predict
from tpmpi.studies.pricing import price
from tpmpi.studies.problem import Problem


def block(**kw) -> Problem:
    base = dict(scheme="block", m=2048, k=1024, n=1024, heads=16, seq=512, backward=True)
    return Problem(**{**base, **kw})


def test_model_flops_follow_narayanan():
    b, t, d, v, layers = 4, 512, 1024, 4096, 3
    gpt = block(scheme="gpt", vocab=v, layers=layers)
    narayanan = 72 * b * t * layers * d * d * (1 + t / (6 * d) + v / (12 * layers * d))
    assert transformer.model_flops(gpt) * 3 == pytest.approx(narayanan, rel=1e-12)
    assert transformer.model_flops(block()) == 24 * b * t * d * d + 4 * b * t * t * d
    fields = transformer.model_fields(block())
    assert fields["step_flops"] == 3 * fields["model_flops"] and fields["batch"] == 4
    # grouped-query heads: fewer K and V weights
    assert transformer.linear_params(transformer.config_of(block(kv_heads=4)), "block") \
        == 12 * d * d - 2 * d * (16 - 4) * 64


@pytest.mark.parametrize("kw,flag", [({"m": 1000}, "--m 1000"), ({"heads": 5}, "--k"),
                                     ({"kv_heads": 3}, "--kv-heads")])
def test_bad_shapes_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        transformer.check_shape(block(**kw))


def test_replicas_take_whole_sequences():
    with pytest.raises(ValueError, match="--dp 3"):
        transformer.check_shape(block(), dp=3)
    transformer.check_shape(block(), dp=4)


def test_schedule_is_the_layers_and_the_split_prices_every_step():
    p = block(options=(("sequence_parallel", True),))
    sched = transformer.schedule(p, 2)
    assert sched == TransformerBlock.schedule_for(4, 512, 1024, 16, 2, sequence_parallel=True,
                                                  backward=True)
    kinds = {transformer.kind_of(s) for s in sched.steps()
             if isinstance(s, (Product, Pointwise, Collective))}
    assert {"products", "attention_core", "elementwise", "allgather",
            "reduce_scatter"} <= kinds
    machine = CalibratedMachine(Calibration())
    parts = transformer.split(sched, machine, backward=True)
    cost = price(sched, machine, backward=True)
    assert sum(v for k, v in parts.items() if k in transformer.SPLIT_ORDER) == \
        pytest.approx(cost.compute_s)
    assert predict(p, 2, (1, 2)).time_s == pytest.approx(cost.time_s)


def test_describe():
    assert transformer.describe(transformer.model_fields(block(kv_heads=4))) == \
        "d=1024 H=16/4 T=512 B=4 L=1 V=-"


def test_run_report_and_plan_take_the_transformer_schemes(tmp_path, capsys):
    from mpi4py import MPI

    from tpmpi.cli import main
    from tpmpi.studies.report import report

    out = tmp_path / "t.jsonl"
    shape = ["--m", "12", "--seq", "6", "--k", "8", "--heads", "2", "--vocab", "5",
             "--iters", "1", "--warmup", "0", "--backward", "--json", str(out)]
    for scheme in ("attention", "block", "gpt"):
        assert main(["run", "--scheme", scheme, "--check"] + shape, MPI.COMM_SELF) == 0
    assert main(["run", "--scheme", "block", "--m", "10", "--seq", "6"], MPI.COMM_SELF) == 2
    assert "--m 10: expected a multiple of --seq 6" in capsys.readouterr().err
    text = Path(report([str(out)], str(tmp_path / "rep"))).read_text()
    assert "## Transformer: where a step goes" in text and "d=8 H=2/2 T=6 B=2 L=2 V=5" in text
    capsys.readouterr()
    assert main(["plan", "--scheme", "block", "--m", "12", "--seq", "6", "--k", "8",
                 "--heads", "2", "--ranks", "2", "--backward"], MPI.COMM_SELF) == 0
    assert "block 1x2 sequence_parallel=True" in capsys.readouterr().out
    assert main(["plan", "--m", "4", "--k", "4", "--ranks", "2"], MPI.COMM_SELF) == 2
