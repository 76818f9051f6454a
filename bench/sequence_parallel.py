"""Summarises bench/sequence_parallel.sh's runs (see there).

Usage: sequence_parallel.py RUNS_DIR WARMUP
"""
import glob
import os
import re
import statistics
import sys


def traces(run_dir):
    """[(tp_rank, step, compute_s, peak_all, peak_ln)] of every worker."""
    out = []
    for log in glob.glob(os.path.join(run_dir, "run", "logs", "worker-*.log")):
        with open(log) as f:
            for line in f:
                if "trace dp_rank=" not in line:
                    continue
                kv = dict(re.findall(r"([a-z_]+)=([^ ]+)", line))
                out.append((int(kv["tp_rank"]), int(kv["step"]),
                            float(kv["compute_s"]),
                            int(kv["peak_activation_bytes"]),
                            int(kv["peak_layernorm_activation_bytes"])))
    return out


def summary(run_dir, warmup):
    """(median slowest-rank step seconds, peak bytes, peak LN bytes)."""
    rows = traces(run_dir)
    if not rows:
        sys.exit(f"sequence_parallel: no trace lines in {run_dir}")
    by_step = {}
    for _, step, t, _, _ in rows:
        if step >= warmup:
            by_step[step] = max(by_step.get(step, 0.0), t)
    return (statistics.median(by_step.values()), max(r[3] for r in rows),
            max(r[4] for r in rows))


def main():
    runs, warmup = sys.argv[1], int(sys.argv[2])
    mib = 1 << 20
    print(f"{'run':<12} {'step s':>8} {'peak act MiB':>13} "
          f"{'LN region MiB':>14} {'x step':>7} {'x act':>7} {'x LN':>7}")
    last = None
    for tp in (2, 4):
        base = summary(os.path.join(runs, f"tp{tp}-plain"), warmup)
        for mode in ("plain", "sp", "sp-vp"):
            s = summary(os.path.join(runs, f"tp{tp}-{mode}"), warmup)
            ratios = (s[0] / base[0], s[1] / base[1], s[2] / base[2])
            print(f"{'tp' + str(tp) + '-' + mode:<12} {s[0]:>8.3f} "
                  f"{s[1] / mib:>13.2f} {s[2] / mib:>14.2f} "
                  f"{ratios[0]:>7.2f} {ratios[1]:>7.2f} {ratios[2]:>7.2f}")
            if mode == "sp":
                last = (tp, ratios)
    tp, (rs, ra, rl) = last
    print(f"sequence parallel tp={tp}: layernorm activations x{rl:.2f}, "
          f"all activations x{ra:.2f}, step time x{rs:.2f}")


if __name__ == "__main__":
    main()
