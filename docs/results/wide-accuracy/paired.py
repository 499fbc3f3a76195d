"""K-FAC's test accuracy minus Adam's on the same seed or split, per graph: mean ± standard error
of the paired differences, and in how many runs K-FAC was above, level, below. A markdown table
with one column per runs.csv (Adam's runs are the same in all of them).

    python docs/results/wide-accuracy/paired.py docs/results/wide-accuracy/{,gcn-input/,gcn-input-adaptive/}runs.csv
"""
import csv
import math
import statistics
import sys

GRAPHS = ("cora", "citeseer", "coauthor-cs", "coauthor-physics")


def paired(path: str) -> dict[str, str]:
    rows = list(csv.DictReader(open(path)))
    test = {(r["optimizer"], r["graph"], r["seed"]): float(r["test_acc"]) for r in rows}
    out = {}
    for g in GRAPHS:
        d = [v - test[("adam", g, s)] for (o, gg, s), v in test.items() if o == "kfac" and gg == g]
        if len(d) < 2:
            out[g] = "—"
            continue
        se = statistics.stdev(d) / math.sqrt(len(d))
        above, level = sum(x > 0 for x in d), sum(x == 0 for x in d)
        out[g] = (f"{statistics.fmean(d):+.2f} ± {se:.2f} ({above} above, {level} level, "
                  f"{len(d) - above - level} below)")
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cols = [paired(p) for p in sys.argv[1:]]
    print("| graph | " + " | ".join(sys.argv[1:]) + " |")
    print("|---|" + "---|" * len(cols))
    for g in GRAPHS:
        print(f"| {g} | " + " | ".join(c[g] for c in cols) + " |")
