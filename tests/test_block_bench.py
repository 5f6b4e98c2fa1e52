"""scripts/block_bench.py without its jobs: the rounds alternate every configuration (the
baseline checkout's TP 2 run in that checkout), a configuration's figure is the median of its
rounds' medians, and the summary's ratios (ceiling, torch, baseline) are taken by name, so a
skipped torch row does not shift them."""
import json

from conftest import load_script

bench = load_script("block_bench")


def fake_runs(monkeypatch, times):
    """Each configuration's record: its round's median from ``times[config][round]``; the
    (config, cwd) of each run in order."""
    calls = []

    def run_json(cmd, path, timeout, cwd=bench.ROOT):
        name = (bench.BASELINE if cwd != bench.ROOT else bench.TORCH
                if "torch_tp_block.py" in " ".join(cmd) else
                "tpmpi TP 2 x 1 thread" if cmd[cmd.index("-n") + 1] == "2" else
                "tpmpi TP 1 x 2 threads")
        k = sum(1 for c in calls if c[0] == name)
        calls.append((name, cwd))
        t = times[name][k]
        return {"time_s": {"median": t, "min": t * 0.9, "max": t * 1.1}, "gflops": 10.0 / t,
                "mem_peak_bytes": 2**20}

    monkeypatch.setattr(bench, "run_json", run_json)
    monkeypatch.setattr(bench, "gemm_rate", lambda *a, **k: 100.0)
    monkeypatch.setattr(bench, "predicted", lambda *a, **k: 0.5)
    return calls


def test_rounds_medians_and_ratios_by_name(monkeypatch, capsys, tmp_path):
    times = {"tpmpi TP 2 x 1 thread": [0.7, 0.6, 0.65], "tpmpi TP 1 x 2 threads": [0.8] * 3,
             bench.TORCH: [0.9, 0.7, 0.75], bench.BASELINE: [0.8, 0.9, 0.85]}
    calls = fake_runs(monkeypatch, times)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: type("R", (), {
        "returncode": 0})())  # torch importable
    out = tmp_path / "b.jsonl"
    assert bench.main(["--rounds", "3", "--baseline", str(tmp_path), "--json", str(out)]) == 0
    assert [c[0] for c in calls] == ["tpmpi TP 2 x 1 thread", "tpmpi TP 1 x 2 threads",
                                     bench.TORCH, bench.BASELINE] * 3
    assert {c[1] for c in calls if c[0] == bench.BASELINE} == {tmp_path.resolve()}
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    rows = {r["config"]: r for r in recs if "config" in r}
    assert rows["tpmpi TP 2 x 1 thread"]["time_s"]["median"] == 0.65
    t = rows[bench.TORCH]["time_s"]
    assert t["median"] == 0.75 and t["min"] == 0.7 * 0.9 and t["max"] == 0.9 * 1.1
    assert rows[bench.TORCH]["predicted_s"] == 0.5
    summary = recs[-1]
    assert summary["ceiling_ratio"] == 0.8 / 0.65
    assert summary["torch_over_tpmpi_tp2"] == 0.75 / 0.65
    assert summary["baseline_over_tpmpi_tp2"] == 0.85 / 0.65
    assert "baseline TP 2 / tpmpi TP 2: 1.308" in capsys.readouterr().out


def test_without_torch_the_ratios_keep_their_names(monkeypatch, tmp_path):
    times = {"tpmpi TP 2 x 1 thread": [0.5], "tpmpi TP 1 x 2 threads": [0.6],
             bench.BASELINE: [1.0]}
    fake_runs(monkeypatch, times)
    out = tmp_path / "b.jsonl"
    assert bench.main(["--rounds", "1", "--no-torch", "--baseline", str(tmp_path),
                       "--json", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    torch_row = next(r for r in recs if r.get("config") == bench.TORCH)
    assert torch_row["skipped"] == "--no-torch"
    summary = recs[-1]
    assert "torch_over_tpmpi_tp2" not in summary
    assert summary["baseline_over_tpmpi_tp2"] == 2.0 and summary["ceiling_ratio"] == 1.2
