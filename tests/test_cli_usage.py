"""What a user sees: --help (defaults, help for every flag, no RST markup), one-line usage
errors that name the flag, plan's calibration warning, the MLP hidden size in table and
record, and the checkpoint script's one-line error."""
import argparse
import json
import re

import pytest

from conftest import load_script, read_records
from tpmpi.cli import main, make_parser


def _subparsers():
    parser = make_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_help_has_text_and_default_for_every_flag():
    parser, subs = _subparsers()
    assert "``" not in parser.format_help() and "`" not in parser.description
    for name, sp in subs.items():
        text = sp.format_help()
        assert "`" not in text, name
        fmt = sp._get_formatter()
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            if not action.option_strings:
                continue
            shown = fmt._get_help_string(action)
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if not switch:
                assert "default" in shown or action.required, (name, action.option_strings)
                assert "(required)" in shown or not action.required


def test_help_shows_the_size_defaults():
    _, subs = _subparsers()
    run = subs["run"].format_help()
    for flag in ("--m M ", "--k K ", "--n N "):
        line = run[run.index("  " + flag):].split("\n")[0]
        assert "(default: 1024)" in line, line
    run = " ".join(run.split())
    assert "4 times --k" in run and "(default: 10)" in run and "(default: 2)" in run
    assert "(default: 4M)" in " ".join(subs["calibrate"].format_help().split())


def _error(capsys, argv) -> str:
    from mpi4py import MPI

    assert main(argv) == 2
    err = capsys.readouterr().err
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, says", [
    (["run", "--scheme", "row", "--panel", "128"],
     "--panel 128: applies to --scheme tile2d only, not row"),
    (["run", "--scheme", "tile2d", "--no-overlap"],
     "--no-overlap: applies to --scheme column, row or mlp only, not tile2d"),
    (["run", "--chunks", "2", "--scheme", "mlp"], "--chunks 2: applies to --scheme column"),
    (["bench", "--scheme", "row,tile2d", "--mode", "book"],
     "--mode book: applies to --scheme mlp only, not row,tile2d"),
    (["run", "--m", "1k"], "argument --m: '1k': expected an integer >= 0"),
    (["run", "--iters", "ten"], "argument --iters: 'ten': expected a positive integer"),
    (["bench", "--k", "8,x"], "argument --k: 'x': expected an integer >= 0"),
    (["bench", "-b", "1x"], "argument -b/--begin: size '1X': expected an integer"),
])
def test_usage_errors_name_the_flag_in_one_line(capsys, argv, says):
    from mpi4py import MPI

    err = _error(capsys, argv)
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert says in err
        assert "_check_options" not in err and "_non_negative" not in err
        assert "parse_size" not in err


def test_plan_says_what_its_calibration_does_not_cover(tmp_path, capsys):
    """The README's calibrate -n 2 then plan --ranks 4 is silent (the nearest fit is the model);
    plan notes the defaults and a file without the curves of local work, warns about another
    backend or a calibration without collectives; a calibration file that is no calibration
    ({}, []) is a usage error naming the field."""
    from mpi4py import MPI

    from tpmpi.studies.localcurves import LocalCurves

    cal = tmp_path / "c.json"  # one path per rank: each rank plans alone (COMM_SELF)
    curves = LocalCurves(1e-6, (16,), (((1e-7,),),), (1e4,), (1e-10,)).to_json()
    old = {"machine": {"source": "calibrate", "ranks": 2, "backend": "numpy"},
           "alpha": {"allgather": {"2": 1e-5}}, "beta": {"allgather": {"2": 1e-9}},
           "rates": {"numpy:float32": {"thin": 1e10, "small": 5e10, "medium": 1e11,
                                       "large": 1e11}}}
    fitted = {**old, "local": {"numpy:float32": curves}}
    base = ["plan", "--m", "64", "--k", "64", "--n", "64", "--ranks", "4"]
    other = ("warning: calibration .* measured the numpy backend: the cupy GEMM rates are the "
             "model's defaults")
    cases = [(fitted, [], ""), (fitted, ["--backend", "cupy"], other),
             (old, [], r"note: calibration .* has no curves of local work"),
             ({**fitted, "alpha": {}, "beta": {}, "machine": {"source": "calibrate",
                                                             "ranks": 1}}, [],
              r"fitted no collective \(calibrate ran on 1 rank\(s\)\)")]
    for data, extra, says in cases:
        cal.write_text(json.dumps(data))
        assert main(base + ["--calibration", str(cal)] + extra, MPI.COMM_SELF) == 0
        err = capsys.readouterr().err
        assert re.search(says, err) if says else err == "", (extra, err)
    assert main(base, MPI.COMM_SELF) == 0
    assert "note: predictions use the cost model's defaults" in capsys.readouterr().err
    for data, says in (({}, "field 'machine' is missing"), ([], "holds a JSON list")):
        cal.write_text(json.dumps(data))
        assert main(base + ["--calibration", str(cal)], MPI.COMM_SELF) == 2
        assert re.search(rf"--calibration: calibration '.*c.json'.*{says}",
                         capsys.readouterr().err)


@pytest.mark.mpi
def test_mlp_hidden_in_table_and_record(world, shared_tmp, capsys):
    comm = world.comm
    path = str(shared_tmp / "r.jsonl")
    argv = ["run", "--scheme", "mlp", "--m", "5", "--k", "3", "--n", "3", "--iters", "1",
            "--warmup", "0", "--json", path]
    assert main(argv, comm) == 0
    if comm.Get_rank() == 0:
        out = capsys.readouterr().out
        assert "hidden=12" in out and ",hidden" not in out  # no empty options label first
        assert read_records(path)[0]["hidden"] == 12
    comm.Barrier()


@pytest.mark.mpi
def test_checkpoint_script_wrong_layer_is_one_line(world, shared_tmp, capsys):
    comm = world.comm
    path = str(shared_tmp / "ck")
    script = load_script("checkpoint_roundtrip")
    assert script.main(["save", path, "--layer", "tile2d"], comm) == 0
    capsys.readouterr()
    assert script.main(["load", path, "--layer", "column"], comm) == 2
    err = capsys.readouterr().err
    if comm.Get_rank() == 0:
        assert err.splitlines() == [
            (f"checkpoint_roundtrip.py: error: load --layer column: checkpoint {path!r} holds a "
             "TileParallelLinear, not a ColumnParallelLinear")]
    else:
        assert err == ""
    assert script.main(["load", path, "--layer", "tile2d"], comm) == 0
