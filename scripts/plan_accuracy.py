#!/usr/bin/env python
"""Cost-model accuracy from bench records:  python scripts/plan_accuracy.py FILE.jsonl [...]
[--calibration calib.json]

Prints (1) median and max of |predicted_s - measured| / measured over all records (with
``--calibration``, predicted_s is recomputed from that calibration; else the recorded one); (2) for
every problem (m, k, n, hidden, dtype, backward, P) with several measured layouts, whether the
layout with the lowest predicted time is the measured-fastest one; (3) whether ``plan``'s
first choice (over all its candidates, with the given calibration) is the measured-fastest
layout, when plan's choice was measured. Exit 0 always (a report, not a test).
"""
from __future__ import annotations

from mpi4py import MPI

from tpmpi.core import launch
from tpmpi.core.launch import Parser, parse_args
from tpmpi.studies.costmodel import load_calibration, plan, predict
from tpmpi.layers.data_parallel import BUCKET_BYTES
from tpmpi.studies.problem import RecordedRun
from tpmpi.studies.report import accuracy, layout, load, problem_key


def main() -> None:
    ap = Parser(prog="plan_accuracy.py", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--noise", type=float, default=0.05,
                    help="a pick within this fraction of the measured fastest time counts as "
                         "fastest too (layouts closer than run-to-run noise tie; default 0.05)")
    ap.add_argument("--calibration", default=None,
                    help="recompute predictions with this calibration (default: as recorded)")
    args = parse_args(ap, None, MPI.COMM_WORLD)
    cal = load_calibration(args.calibration)
    recs = [r for r in load(args.files) if "scheme" in r and "time_s" in r]
    if args.calibration:
        for r in recs:
            run = RecordedRun.of(r)
            pred = predict(run.problem, r["ranks"], run.grid, cal, r["backend"], dp=run.dp,
                           bucket_bytes=run.bucket_bytes or BUCKET_BYTES)
            r["predicted_s"] = pred.time_s if pred else None
    recs = [r for r in recs if r.get("predicted_s")]
    acc = accuracy(recs)
    if not acc["records"]:
        print("no records with predicted_s")
        return
    print(f"(1) median |predicted - measured| / measured = {acc['median_rel_err']:.1%} "
          f"over {acc['records']} records (max {acc['max_rel_err']:.1%})")
    print(f"(2) lowest predicted = measured fastest in {acc['ranked_first']} of "
          f"{acc['problems']} problems")
    for p in acc["picks"]:
        print(f"    {p['problem']}: measured {p['measured_fastest']!r}, predicted "
              f"{p['predicted_fastest']!r}, {'HIT' if p['hit'] else 'miss'} ({p['loss']:.2f}x)")
    ties = sum(p["loss"] <= 1 + args.noise for p in acc["picks"])
    print(f"(2b) lowest predicted within {args.noise:.0%} of the measured fastest in {ties} of "
          f"{len(acc['picks'])} problems")
    by_problem: dict = {}
    for r in recs:
        by_problem.setdefault(problem_key(r), []).append(r)
    hits = total = near = 0
    for key, group in by_problem.items():
        if len({layout(r) for r in group}) < 2:
            continue
        r0 = group[0]
        top = plan(r0["m"], r0["k"], r0["n"], r0["ranks"], hidden=r0["hidden"] if
                   r0["scheme"] == "mlp" else None, dtype=r0["dtype"],
                   backward=bool(r0.get("backward")), backend=r0["backend"], calibration=cal)[0]
        fastest = min(group, key=lambda r: r["time_s"]["median"])
        measured = {layout(r) for r in group}
        label = top.label
        if label in measured:
            total += 1
            hits += label == layout(fastest)
            mine = min(r["time_s"]["median"] for r in group if layout(r) == label)
            near += mine <= (1 + args.noise) * fastest["time_s"]["median"]
        print(f"    plan's first for {dict(zip(('m', 'k', 'n', 'hidden'), key[:4]))} "
              f"P={key[-1]}: {label!r} ({'measured' if label in measured else 'not measured'})"
              f"; measured fastest {layout(fastest)!r}")
    print(f"(3) plan's first choice = measured fastest in {hits} of {total} problems where "
          f"it was measured; within {args.noise:.0%} of it in {near} of {total}")


if __name__ == "__main__":
    launch.run(main, "plan_accuracy.py")
