"""scripts/train_gpt.py at a tiny size: every dp x tp layout (with sequence parallelism and
dropout) trains exactly like the serial float64 run and samples the same text; a run resumed
at another layout continues the uninterrupted curve; records; usage errors on every rank."""
import math

import numpy as np
import pytest

from conftest import all_ranks_raise, load_script, read_records, rel_err
from tpmpi.core import launch

train_gpt = load_script("train_gpt")

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch",
        "4", "--steps", "4", "--warmup", "2", "--eval-every", "2", "--eval-batches", "1",
        "--log-every", "1", "--sample-chars", "12", "--peak-size", "32", "--quiet"]
LAYOUTS = [("1", "4", False), ("2", "2", False), ("4", "1", False), ("1", "4", True)]


def layout_argv(dp: str, tp: str, sp: bool) -> list:
    return ["--dp", dp, "--tp", tp] + (["--sequence-parallel"] if sp else [])


def test_schedule_decay_groups_and_the_adamw_step():
    args = train_gpt.build_parser().parse_args(["--lr", "1e-2", "--warmup", "4"])
    lrs = [train_gpt.learning_rate(args, s, 14) for s in range(16)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[9] == pytest.approx(1e-3 + 0.5 * 9e-3)  # half-way down the cosine
    assert lrs[14] == lrs[15] == pytest.approx(1e-3)
    assert [train_gpt.decays(n) for n in ("transformer.wte.weight", "transformer.wpe.weight",
                                          "transformer.h.0.ln_1.weight",
                                          "transformer.h.0.attn.c_attn.weight",
                                          "transformer.h.0.mlp.c_fc.bias",
                                          "transformer.ln_f.weight")] == \
        [True, False, False, True, False, False]
    assert train_gpt.clip_scale(4.0, 1.0) == pytest.approx(0.25, rel=1e-5)
    assert train_gpt.clip_scale(0.5, 1.0) == train_gpt.clip_scale(9.0, 0.0) == 1.0

    class One:  # a model of one decayed and one plain parameter
        def parameters(self):
            return iter(self.params)

    model = One()
    w, b = np.array([1.0, -2.0]), np.array([0.5])
    model.params = [("a.weight", w, np.array([0.1, 0.1])), ("a.bias", b, np.array([-0.3]))]
    opt = train_gpt.AdamW(model, weight_decay=0.5)
    opt.step(lr=0.1, grad_scale=2.0)
    # torch.optim.AdamW's first step: p (1 - lr wd) - lr sign(g) (moments bias-corrected)
    assert w == pytest.approx([1.0 * 0.95 - 0.1, -2.0 * 0.95 - 0.1], rel=1e-6)
    assert b == pytest.approx([0.5 + 0.1], rel=1e-6)


def test_text_split_and_entropy():
    text = train_gpt.corpus()
    assert len(text.train) + len(text.val) > 400_000 and len(text.chars) > 60
    assert text.decode(text.encode("def f():")) == "def f():"
    assert 2.5 < text.entropy < math.log(len(text.chars))


@pytest.mark.mpi
@pytest.mark.world_sizes(4)
def test_every_layout_with_dropout_trains_like_serial_float64(world, shared_tmp):
    comm = world.comm
    path = shared_tmp / "gpt.jsonl"
    samples, curves = [], []
    for i, (dp, tp, sp) in enumerate(LAYOUTS):
        argv = TINY + layout_argv(dp, tp, sp) + ["--dtype", "float64", "--dropout", "0.1",
                                                 "--check"]
        out = train_gpt.main(argv + (["--json", str(path)] if i == 0 else []), comm)
        assert out["agree"], (dp, tp, sp, out["max_rel_diff"])
        assert out["max_rel_diff"] <= 1e-10
        if comm.Get_rank() == 0:
            assert rel_err(out["losses"], out["serial"]) <= 1e-10
        assert len(set(comm.allgather(out["sample"]))) == 1
        samples.append(out["sample"])
        curves.append(out["losses"])
    assert len(set(samples)) == 1 and len(samples[0]) == 12
    assert max(rel_err(c, curves[0]) for c in curves) <= 1e-10
    assert curves[0][-1] < curves[0][0] < math.log(train_gpt.corpus().chars.__len__()) + 0.1
    if comm.Get_rank() == 0:
        recs = read_records(path)
        assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
        assert all({"train_loss", "tokens_per_s", "serial_loss"} <= set(r) for r in recs[:4])
        assert [("val_loss" in r) for r in recs[:4]] == [False, True, False, True]
        assert recs[-1]["sample"] == samples[0] and "train_loss" not in recs[-1]


@pytest.mark.mpi
@pytest.mark.world_sizes(4)
def test_resume_at_another_layout_continues_the_uninterrupted_run(world, shared_tmp):
    comm = world.comm
    argv = TINY + ["--dtype", "float64", "--dropout", "0.1", "--decay-steps", "6"]
    whole = train_gpt.main(argv + layout_argv("2", "2", False) + ["--steps", "6"], comm)
    ckpt = str(shared_tmp / "ckpt")
    first = train_gpt.main(argv + layout_argv("1", "4", True) + ["--steps", "3", "--save", ckpt],
                           comm)
    rest = train_gpt.main(argv + layout_argv("4", "1", False) + ["--steps", "3", "--resume",
                                                                  ckpt, "--check"], comm)
    assert rest["steps"] == [3, 4, 5] and rest["agree"]
    assert rel_err(first["losses"] + rest["losses"], whole["losses"]) <= 1e-10
    assert abs(rest["val_loss"] - whole["val_loss"]) <= 1e-10 * whole["val_loss"]
    assert rest["sample"] == whole["sample"]
    all_ranks_raise(comm, lambda: train_gpt.main(argv + ["--seed", "1", "--resume", ckpt],
                                                 comm),
                    "--seed=1: the checkpoint .* was saved with 0")


@pytest.mark.mpi
def test_bad_flags_are_usage_errors_on_every_rank(world):
    comm = world.comm

    def run(extra):
        return lambda: train_gpt.main(TINY + extra, comm)

    cases = [(["--dp", "5"], f"--dp=5: expected a divisor of the {world.size} ranks"),
             (["--tp", "5"], rf"--dp 1 x --tp 5: expected dp \* tp = the {world.size} ranks"),
             (["--n-embd", "6", "--n-head", "4"], "n_embd=6: expected a multiple of n_head=4"),
             (["--lr", "0"], "--lr=0.0: expected a positive finite number"),
             (["--dropout", "1.5"], "1.5"),
             (["--steps", "x"], "argument --steps")]
    if world.size % 2 == 0:
        cases.append((["--dp", "2", "--batch", "3"], "--batch=3: expected a multiple of --dp=2"))
    for extra, match in cases:
        all_ranks_raise(comm, run(extra), match)
        assert launch.exit_code(run(extra), comm, "train_gpt.py") == launch.EXIT_USAGE
