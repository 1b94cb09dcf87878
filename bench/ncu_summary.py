#!/usr/bin/env python3
"""Per-kernel GPU time from an ncu CSV (--metrics gpu__time_duration.sum --csv): the kernels of
the last `--tokens` decode steps (those after the last prefill-only kernel) and of the rest.
    python3 bench/ncu_summary.py ncu.csv --tokens 3"""
import argparse
import collections
import csv
import re

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--tokens", type=int, default=1, help="decode steps at the end of the run")
a = ap.parse_args()
rows = []
with open(a.csv, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        name = re.sub(r"\(.*", "", r["Kernel Name"]).replace("void ", "")
        unit = r["Metric Unit"]
        v = float(r["Metric Value"].replace(",", ""))
        rows.append((name, v * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "ns": 1e-3}.get(unit, 1.0)))
prefill_only = ("rmsnorm_kernel", "to_float_kernel", "swiglu_kernel", "store_exact_kernel")
last = max([i for i, (n, _) in enumerate(rows) if n.startswith(prefill_only) or "gemm" in n.lower() or "sgemm" in n.lower()],
           default=-1)
for title, part, per in (("prefill and the rest", rows[:last + 1], 1), (f"decode, {a.tokens} steps", rows[last + 1:], a.tokens)):
    agg = collections.defaultdict(lambda: [0, 0.0])
    for n, v in part:
        agg[n][0] += 1
        agg[n][1] += v
    total = sum(v for _, v in part)
    print(f"\n{title}: {len(part)} kernels, {total:.1f} us" + (f", {total / per:.1f} us per step" if per > 1 else ""))
    for n, (cnt, v) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"  {v / per:9.1f} us  {cnt / per:6.1f} x  {v / cnt:8.2f} us each  {n}")
