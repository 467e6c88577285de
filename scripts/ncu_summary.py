#!/usr/bin/env python3
"""Where a decode step's device time goes, from an ncu CSV (--csv --print-units base, with the
metrics gpu__time_duration.sum, dram__bytes_read.sum and dram__bytes_write.sum).

usage: ncu_summary.py NCU.csv [--bandwidth GB/s]
Prints, per kernel name: launches, total and mean time, DRAM bytes and the achieved rate (against
the copy bandwidth when given), largest total first."""
import argparse
import csv
import collections
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="measured copy bandwidth, GB/s")
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own ==PROF== lines are not CSV
    if not lines:
        sys.exit("ncu_summary: no CSV rows in " + a.csv)
    launches = collections.OrderedDict()
    for row in csv.DictReader(lines):
        k = launches.setdefault(row["ID"], {"name": row["Kernel Name"].split("(")[0], "m": {}})
        try:
            k["m"][row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            pass
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in launches.values():
        s = by_name[k["name"]]
        s[0] += 1
        s[1] += k["m"].get("gpu__time_duration.sum", 0.0)  # ns
        s[2] += k["m"].get("dram__bytes_read.sum", 0.0) + k["m"].get("dram__bytes_write.sum", 0.0)
    total_ns = sum(s[1] for s in by_name.values())
    total_b = sum(s[2] for s in by_name.values())
    print(f"{len(launches)} launches, {total_ns / 1e3:.1f} us of kernel time, {total_b / 1e9:.3f} GB of DRAM traffic")
    print(f"{'kernel':40} {'n':>5} {'total us':>10} {'share':>6} {'mean us':>8} {'GB/s':>7} {'of bw':>6}")
    for name, (n, ns, b) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        rate = b / ns if ns else 0.0  # bytes per ns = GB/s
        frac = f"{100 * rate / a.bandwidth:5.1f}%" if a.bandwidth else ""
        print(f"{name[:40]:40} {n:5d} {ns / 1e3:10.1f} {100 * ns / total_ns:5.1f}% {ns / n / 1e3:8.2f} {rate:7.0f} {frac:>6}")


if __name__ == "__main__":
    main()
