"""Benchmark: paired bootstrap of accuracy deltas at scale vs a plain Python loop.

Workload: 1,000,000 items x 5 candidates (+ baseline) x 30 slices x 1,000 resamples of
synthetic binary outcomes; slices are an int column with 30 values. Times
:func:`kit.analysis.compare.paired_bootstrap` (``method="auto"``, which picks the exact "counts"
path for binary data) and, on fewer resamples scaled up, the general "indices" and
"poisson" paths that any metric can use. The reference is lm-evaluation-harness's
``bootstrap_stderr`` inner loop (``f(rnd.choices(xs, k=len(xs)))`` with ``f = mean``, one
process) on a subset, scaled linearly to the full item count.

Run: ``.venv/bin/python benchmarks/bootstrap.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time

import numpy as np

from kit.analysis.compare import paired_bootstrap


def synthetic(n_items: int, n_candidates: int, n_slices: int, seed: int = 0):
    """Baseline ~80% right; candidate j flips 2-10% of items; slice ids 0..n_slices-1."""
    rng = np.random.default_rng(seed)
    slices = rng.integers(0, n_slices, n_items)
    base = (rng.random(n_items) < 0.8).astype(np.float64)
    candidates = {}
    for j in range(n_candidates):
        flip = rng.random(n_items) < 0.02 * (j + 1)
        candidates[f"cand{j + 1}"] = np.where(flip, 1.0 - base, base)
    return base, candidates, slices


def lm_eval_loop(xs: list[float], iters: int, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds per resample of lm-eval's loop: ``mean(rnd.choices(xs, k=len(xs)))``."""

    def mean(arr):
        return sum(arr) / len(arr)

    rnd = random.Random(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        mean(rnd.choices(xs, k=len(xs)))
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(label: str, **kwargs) -> tuple[float, float, object]:
    """Run paired_bootstrap; return (wall s, CPU s of this process, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = paired_bootstrap(**kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"  {label:<36s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak RSS so far {peak_rss_mb():5.0f} MB"
    )
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument(
        "--general-resamples",
        type=int,
        default=40,
        help="resamples for the indices/poisson paths (scaled to --resamples); 0 skips",
    )
    parser.add_argument("--py-items", type=int, default=10_000)
    parser.add_argument("--py-resamples", type=int, default=20)
    args = parser.parse_args()

    base, candidates, slices = synthetic(args.items, args.candidates, args.slices)
    print(
        f"data: {args.items:,} items x {args.candidates} candidates x {args.slices} slices; "
        f"peak RSS after data {peak_rss_mb():.0f} MB"
    )
    common = {"baseline": base, "candidates": candidates, "groups": {"slice": slices}}
    for method in ("counts", "indices", "poisson"):  # warm up lazy imports (scipy.stats ...)
        paired_bootstrap(base[:64], {"c": base[:64]}, n_resamples=2, method=method)
    print(f"paired_bootstrap, {args.resamples:,} resamples:")
    full, full_cpu, table = timed("auto (exact counts path)", n_resamples=args.resamples, **common)
    assert len(table) == args.candidates * (1 + args.slices)

    for method in ("indices", "poisson") if args.general_resamples else ():
        # fit CPU time = setup + per_resample * R from two run lengths, then extrapolate
        short_r, long_r = max(1, args.general_resamples // 5), args.general_resamples
        _, short, _ = timed(
            f"{method}, {short_r} resamples", method=method, n_resamples=short_r, **common
        )
        _, long, _ = timed(
            f"{method}, {long_r} resamples", method=method, n_resamples=long_r, **common
        )
        marginal = (long - short) / (long_r - short_r)
        setup = short - marginal * short_r
        print(
            f"    -> {method}: cpu setup {setup:.1f} s + {marginal * 1e3:.1f} ms per resample; "
            f"{args.resamples:,} resamples ~ {setup + marginal * args.resamples:.0f} s cpu"
        )

    xs = base[: args.py_items].tolist()
    scale = args.items / args.py_items
    py_wall, py_cpu = (t * scale for t in lm_eval_loop(xs, args.py_resamples))
    print(
        f"lm-eval loop ({args.py_items:,} items x {args.py_resamples} resamples, scaled to "
        f"{args.items:,} items): wall {py_wall * 1e3:.1f} ms, cpu {py_cpu * 1e3:.1f} ms "
        "per resample per statistic"
    )
    work = (1 + args.candidates) * 2  # lm-eval: every model, overall + slices (slices sum to n)
    print("per resample (kit: 5 candidate deltas x 31 overall/slice cells in one pass):")
    for kind, ours, py in (("wall", full, py_wall), ("cpu", full_cpu, py_cpu)):
        per = ours / args.resamples
        print(
            f"  {kind:<4s} kit {per * 1e3:.2f} ms | ratio vs one lm-eval statistic "
            f"(conservative) {py / per:,.0f}x | vs lm-eval doing the same work {py * work / per:,.0f}x"
        )
    print(
        f"full run wall {full:.2f} s, cpu {full_cpu:.2f} s (goal <= 20 s); peak RSS "
        f"{peak_rss_mb():.0f} MB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    overall = table[table["slice"] == "overall"][["candidate", "delta", "ci_low", "ci_high"]]
    print(overall.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
