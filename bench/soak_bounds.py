"""The soak's verdict: what may grow, by how much, and the checks that say so.

Two kinds of check, each on the samples of bench.soak_sampler:

- Trend, under load, per process lifetime (a restarted worker is a new series: its RSS
  starts over): the median of the last fifth of the samples after the lifetime's
  warm-up against the median of the first fifth. Medians, not the first and last
  sample, so one sample taken mid-burst or mid-collection neither fails nor hides a
  leak. RSS may grow by the larger of `rss_share` and `rss_bytes` (allocators and
  caches settle in steps), open fds by `fds`.
- Idle, per process name: with traffic stopped and drained, the end of the run against
  the same pause after warm-up. Asyncio tasks (`tasks`) and fds (`fds`) are judged
  here, where what is in flight does not count; a worker's KV blocks in use and the
  gateway's requests in flight must be back to 0. Blocks in use are total - free:
  a worker's free count already includes the idle blocks it keeps for the prefix cache
  (reusable, evicted on demand), so those are never taken for a leak.
"""

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1024 * 1024
# Sample phases: traffic before the baseline; the idle pause after it; the traffic that
# is judged; the idle pause at the end. Samples taken while draining have phase "drain".
WARMUP, BASELINE, LOAD, END, DRAIN = "warmup", "idle-baseline", "load", "idle-end", "drain"


@dataclass(frozen=True)
class Bounds:
    warmup: float = 120.0  # seconds of each lifetime not judged for trend
    rss_share: float = 0.10
    rss_bytes: int = 64 * MIB
    fds: int = 8
    tasks: int = 16
    edge_share: float = 0.2  # the share of a series whose median is its start or end
    min_samples: int = 10  # after warm-up, for a lifetime's trend to be judged

    def describe(self) -> str:
        return (f"RSS growth <= max({self.rss_share:.0%}, {self.rss_bytes / MIB:g} MiB) and "
                f"open fds <= +{self.fds} per process lifetime under load after "
                f"{self.warmup:g} s of warm-up (median of the last {self.edge_share:.0%} "
                f"of samples against the first {self.edge_share:.0%}); idle again after the "
                f"run: asyncio tasks <= +{self.tasks} and fds <= +{self.fds} over the "
                f"idle pause after warm-up, KV blocks in use (total - free; the prefix "
                f"cache's idle blocks count as free) and the gateway's requests in flight "
                f"== 0")


@dataclass(frozen=True)
class Check:
    process: str
    span: str  # "pid 123" (a lifetime's trend) or "idle"
    metric: str
    start: float | None
    end: float | None
    bound: float
    ok: bool | None  # None: not judged (see note)
    note: str = ""
    level: bool = False  # the bound is on the end value, not on the growth

    @property
    def growth(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


# metric key in a sample -> (label, scale shown in the table)
METRICS = {"rss_bytes": ("RSS MiB", MIB), "fds": ("open fds", 1),
           "asyncio_tasks": ("asyncio tasks", 1), "kv_blocks_in_use": ("KV blocks in use", 1),
           "in_flight": ("requests in flight", 1)}


def lifetimes(samples: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """(process, lifetime) -> its samples in time order: a restarted process is a new
    series, compared only with itself."""
    series: dict[tuple[str, str], list[dict]] = {}
    for s in sorted(samples, key=lambda s: s["t"]):
        series.setdefault((s["process"], s["lifetime"]), []).append(s)
    return series


def edges(values: list[float], share: float) -> tuple[float, float]:
    """Medians of the first and the last `share` of `values` (at least 3 values each
    when there are that many)."""
    k = min(len(values), max(3, math.ceil(share * len(values))))
    return statistics.median(values[:k]), statistics.median(values[-k:])


def trend_checks(samples: list[dict], bounds: Bounds) -> list[Check]:
    checks = []
    judged: dict[tuple[str, str], bool] = {}
    for (process, lifetime), series in lifetimes(samples).items():
        born = series[0]["t"]
        for key, bound_of in (("rss_bytes", lambda v: max(bounds.rss_share * v,
                                                          bounds.rss_bytes)),
                              ("fds", lambda v: bounds.fds)):
            values = [s[key] for s in series if s["phase"] == LOAD
                      and s["t"] >= born + bounds.warmup and s.get(key) is not None]
            judged.setdefault((process, key), False)
            if len(values) < bounds.min_samples:
                checks.append(Check(process, lifetime, key, None, None, math.nan, None,
                                    f"{len(values)} samples after its warm-up: too few "
                                    f"to judge"))
                continue
            start, end = edges(values, bounds.edge_share)
            bound = bound_of(start)
            judged[(process, key)] = True
            checks.append(Check(process, lifetime, key, start, end, bound,
                                end - start <= bound))
    for (process, key), any_judged in judged.items():
        if not any_judged:  # a run too short must not pass for want of a verdict
            checks.append(Check(process, "any", key, None, None, math.nan, False,
                                "no lifetime lasted past its warm-up: run longer"))
    return checks


def idle_level(samples: list[dict], process: str, phase: str, key: str) -> float | None:
    values = [s[key] for s in samples if s["process"] == process and s["phase"] == phase
              and s.get(key) is not None]
    return statistics.median(values) if values else None


def idle_checks(samples: list[dict], bounds: Bounds) -> list[Check]:
    checks = []
    bounded = (("asyncio_tasks", bounds.tasks, False), ("fds", bounds.fds, False),
               ("kv_blocks_in_use", 0, True), ("in_flight", 0, True))
    for process in sorted({s["process"] for s in samples}):
        for key, bound, level in bounded:
            start = idle_level(samples, process, BASELINE, key)
            end = idle_level(samples, process, END, key)
            if start is None and end is None:
                continue  # not a metric of this process (a worker has no requests)
            if end is None:
                ok, note = False, "no sample at the end: was it down?"
            elif level:
                ok, note = end <= bound, ""
            else:
                ok = start is not None and end - start <= bound
                note = "" if start is not None else "no sample at the baseline"
            checks.append(Check(process, "idle", key, start, end, bound, ok, note, level))
    return checks


def verdict(samples: list[dict], bounds: Bounds) -> list[Check]:
    return trend_checks(samples, bounds) + idle_checks(samples, bounds)


def passed(checks: list[Check]) -> bool:
    return all(c.ok is not False for c in checks)


def _number(value: float | None, scale: float, sign: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value / scale:{sign}.1f}" if scale != 1 else f"{value:{sign}.0f}"


def format_checks(checks: list[Check]) -> str:
    rows = [("process", "span", "metric", "start", "end", "growth", "bound", "ok")]
    for c in checks:
        label, scale = METRICS[c.metric]
        bound = "-" if math.isnan(c.bound) else (
            f"== {_number(c.bound, scale)}" if c.level else f"<= +{_number(c.bound, scale)}")
        ok = {True: "yes", False: "NO", None: "-"}[c.ok]
        rows.append((c.process, c.span, label, _number(c.start, scale),
                     _number(c.end, scale), _number(c.growth, scale, "+"), bound,
                     ok + (f" ({c.note})" if c.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False))
                     + "  " + r[-1] for r in rows)
