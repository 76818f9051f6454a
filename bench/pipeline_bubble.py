#!/usr/bin/python3
"""Reads the worker trace logs of bench/pipeline_bubble.sh and prints the
pipeline-bubble table (see the header comment of pipeline_bubble.sh).

Usage: pipeline_bubble.py DIR PP WARMUP REPEATS GPIPE_M M [M ...]
DIR holds the run directories pp1-m<M>-r<R>, pp<PP>-1f1b-m<M>-r<R> (and
pp<PP>-gpipe-m<GPIPE_M>-r<R> when GPIPE_M > 0) for R in [0, REPEATS), each
with logs/worker-<rank>.log. With REPEATS > 1 each configuration takes the
repeat with the smallest median step time (other load on a shared machine
only ever makes a run slower).
"""
import glob
import os
import re
import statistics
import sys

TRACE = re.compile(r"\btrace\b(.*)$")
KV = re.compile(r"(\w+)=(\S+)")


def traces(run_dir):
    """{(pp_rank, step): fields} from every worker log; a later line for the
    same (stage, step) replaces an earlier one."""
    out = {}
    logs = sorted(glob.glob(os.path.join(run_dir, "logs", "worker-*.log")))
    if not logs:
        sys.exit(f"pipeline_bubble: no worker logs in {run_dir}/logs")
    for path in logs:
        with open(path, errors="replace") as f:
            for line in f:
                m = TRACE.search(line)
                if not m:
                    continue
                kv = dict(KV.findall(m.group(1)))
                if "step" not in kv:
                    continue
                out[(int(kv.get("pp_rank", 0)), int(kv["step"]))] = kv
    return out


def steps_after_warmup(tr, warmup):
    steps = sorted({s for (_, s) in tr if s >= warmup})
    if not steps:
        sys.exit("pipeline_bubble: no traced step after the warm-up steps")
    return steps


def baseline(run_dir, warmup):
    """Median over steps of the pp=1 worker's compute time, in seconds."""
    tr = traces(run_dir)
    return statistics.median(
        (int(tr[(0, s)]["push_start_us"]) - int(tr[(0, s)]["pull_done_us"])) / 1e6
        for s in steps_after_warmup(tr, warmup))


def pipeline(run_dir, pp, warmup):
    """(median over steps of max over stages of compute_s, median bubble of
    each stage, median busy seconds (compute_s * (1 - bubble)) of each
    stage)."""
    tr = traces(run_dir)
    steps = [s for s in steps_after_warmup(tr, warmup)
             if all((p, s) in tr for p in range(pp))]
    if not steps:
        sys.exit(f"pipeline_bubble: no step traced by all {pp} stages in {run_dir}")
    t = statistics.median(
        max(float(tr[(p, s)]["compute_s"]) for p in range(pp)) for s in steps)
    bubble = [statistics.median(float(tr[(p, s)]["bubble"]) for s in steps)
              for p in range(pp)]
    busy = [statistics.median(float(tr[(p, s)]["compute_s"]) *
                              (1 - float(tr[(p, s)]["bubble"])) for s in steps)
            for p in range(pp)]
    return t, bubble, busy


def main():
    if len(sys.argv) < 7:
        sys.exit(__doc__)
    root, pp, warmup, repeats, gpipe_m = (sys.argv[1], int(sys.argv[2]),
                                          int(sys.argv[3]), int(sys.argv[4]),
                                          int(sys.argv[5]))
    ms = [int(m) for m in sys.argv[6:]]
    rows = [(m, "1f1b") for m in ms]
    if gpipe_m > 0:
        rows.append((gpipe_m, "gpipe"))

    def dirs(name):
        return [os.path.join(root, f"{name}-r{r}") for r in range(repeats)]

    t1 = {m: min(baseline(d, warmup) for d in dirs(f"pp1-m{m}"))
          for m in sorted({m for m, _ in rows})}

    best = "" if repeats == 1 else f", best of {repeats} runs"
    print(f"== pp={pp} against pp=1 (one core per worker), medians over steps "
          f">= {warmup}{best}; times in seconds per step")
    hdr = ("m", "sched", "T1", "Tpp meas", "Tpp ideal", "ideal/meas",
           "bubble meas", "bubble formula", "speed-up T1/Tpp")
    fmt = "{:>2} {:>5} {:>7} {:>9} {:>9} {:>10} {:>11} {:>14} {:>15}"
    print(fmt.format(*hdr))
    diag = []
    headline = None
    for m, sched in rows:
        t, bubble, busy = min(
            (pipeline(d, pp, warmup) for d in dirs(f"pp{pp}-{sched}-m{m}")),
            key=lambda r: r[0])
        formula = (pp - 1) / (m + pp - 1)
        ideal = t1[m] / pp * (m + pp - 1) / m
        print(fmt.format(m, sched, f"{t1[m]:.3f}", f"{t:.3f}", f"{ideal:.3f}",
                         f"{ideal / t:.2f}", f"{bubble[0]:.3f}",
                         f"{formula:.3f}", f"{t1[m] / t:.2f}"))
        diag.append((m, sched, bubble, busy, t1[m]))
        if m == 8 and sched == "1f1b":
            headline = ideal / t
    print(f"== per stage: busy = compute_s * (1 - bubble) (ideal: T1/{pp} each), "
          "bubble; busy sum / T1 (1.00: the split adds no work)")
    for m, sched, bubble, busy, t1m in diag:
        stages = "  ".join(f"stage {p}: busy {busy[p]:.3f} bubble {bubble[p]:.3f}"
                           for p in range(pp))
        print(f"m={m} {sched:5}  {stages}  busy/(T1/{pp}) max "
              f"{max(busy) / (t1m / pp):.2f}  busy sum/T1 {sum(busy) / t1m:.2f}")
    if headline is not None:
        print(f"pipeline pp={pp} m=8: ideal/measured {headline:.2f}")


if __name__ == "__main__":
    main()
