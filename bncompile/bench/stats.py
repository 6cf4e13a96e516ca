"""Statistics of one variant's timed rounds against the baseline's (the same rounds)."""

from __future__ import annotations

import numpy as np

from bncompile.bench.report import VariantResult


def summarize(result: VariantResult, secs: list[float], base: list[float], batch: int,
              cpu: list[float], cpu_base: list[float]) -> None:
    """Fill ``result``'s latency percentiles, throughput (batch / median), the median of the
    per-round ratios to the baseline (wall and CPU time) and the ratio of medians."""
    ms = np.asarray(secs) * 1e3
    p10, p25, p50, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
    result.median_ms, result.p10_ms, result.p25_ms = float(p50), float(p10), float(p25)
    result.p75_ms, result.p90_ms = float(p75), float(p90)
    result.mean_ms, result.min_ms = float(ms.mean()), float(ms.min())
    result.throughput = batch / (p50 / 1e3)
    result.ratio = float(np.median(np.asarray(secs) / np.asarray(base)))
    result.ratio_of_medians = float(p50 / (np.median(base) * 1e3))
    c, cb = np.asarray(cpu), np.asarray(cpu_base)
    result.cpu_median_ms = float(np.median(c) * 1e3)
    wall = float(np.sum(secs))
    result.parallelism = float(np.sum(c) / wall) if wall > 0 else None
    if np.all(cb > 0):
        result.cpu_ratio = float(np.median(c / cb))
    result.samples = len(secs)


def summarize_settled(result: VariantResult, times, name: str, base: str, batch: int) -> None:
    """:func:`summarize` from the first calls of settled rounds (``times``: a
    :class:`bncompile.bench.timing.SettledTimes`), then the back-to-back second calls (median and
    median per-round ratio to the baseline's second calls) and the spin tail after them."""
    summarize(result, times.wall[name], times.wall[base], batch, times.cpu[name], times.cpu[base])
    warm = np.asarray(times.warm_wall[name])
    result.warm_median_ms = float(np.median(warm) * 1e3)
    result.warm_ratio = float(np.median(warm / np.asarray(times.warm_wall[base])))
    result.spin_cpu_ms = float(np.median(times.spin_cpu[name]) * 1e3)
    result.spin_wall_ms = float(np.median(times.spin_wall[name]) * 1e3)
    result.unsettled = int(times.unsettled[name])
    result.threads_busy = times.busy_threads.get(name)
