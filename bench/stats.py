"""The load generator's arithmetic: per-request timings in, a run's report out.

Definitions (the ones vLLM's and DistServe's benchmarks use):
- TTFT: request sent to first token received.
- TPOT: (latency - TTFT) / (output tokens - 1), per request with 2+ output tokens.
- ITL: time between consecutive streamed chunks of one request.
- goodput: completed requests per second that met every SLO (TTFT and TPOT), over the
  run's duration; SLO attainment: the share of all requests (failed ones included)
  that met them.
"""

import math
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0          # seconds
    latency: float = 0.0       # seconds, sent to last byte (of a refusal too)
    itls: list[float] = field(default_factory=list)
    error: str = ""
    start: float = 0.0         # seconds since the run began
    turn: int = 0              # 1, 2, ... for the turns of a conversation; 0 otherwise
    cached_tokens: int = 0     # usage.prompt_tokens_details.cached_tokens, when sent
    priority: int | None = None  # the request's class in a priority mix
    status: int = 0            # HTTP status of the answer; 0 when none came
    retry_after: str | None = None  # the Retry-After header of a refusal
    error_code: str = ""       # the error body's code ("expected_wait", "client_timeout")

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """'ttft=500,tpot=100' in milliseconds."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("ttft", "tpot"):
                raise ValueError(f"SLO part {part!r}: expected ttft=MS or tpot=MS")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"SLO part {part!r}: {value!r} is not a number") from None
            if ms <= 0:
                raise ValueError(f"SLO part {part!r}: must be > 0")
            values[key] = ms / 1000
        if not values:
            raise ValueError("SLO is empty: expected ttft=MS,tpot=MS")
        return cls(**values)

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft is not None and r.ttft > self.ttft:
            return False
        if self.tpot is not None:
            tpot = r.tpot
            # One output token has no TPOT to miss.
            if tpot is not None and tpot > self.tpot:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.ttft is not None:
            parts.append(f"ttft={self.ttft * 1000:g}")
        if self.tpot is not None:
            parts.append(f"tpot={self.tpot * 1000:g}")
        return ",".join(parts)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def summarize(results: list[RequestResult], duration: float,
              slo: SLO | None = None) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    report = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_token_throughput": out_tokens / duration if duration > 0 else math.nan,
        "total_token_throughput": (in_tokens + out_tokens) / duration
        if duration > 0 else math.nan,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_s": distribution([r.ttft for r in done]),
        "tpot_s": distribution([t for r in done if (t := r.tpot) is not None]),
        "itl_s": distribution([x for r in done for x in r.itls]),
        "e2e_s": distribution([r.latency for r in done]),
    }
    turns = sorted({r.turn for r in done if r.turn})
    if turns:
        report["ttft_by_turn_s"] = {str(t): distribution([r.ttft for r in done if r.turn == t])
                                    for t in turns}
        # Every turn after the first together: those with a history to take from a cache.
        report["ttft_later_turns_s"] = distribution([r.ttft for r in done if r.turn >= 2])
        report["cached_tokens"] = sum(r.cached_tokens for r in done)
    priorities = sorted({r.priority for r in results if r.priority is not None})
    if priorities:
        report["by_priority"] = {str(p): {
            "completed": sum(1 for r in done if r.priority == p),
            "failed": sum(1 for r in results if r.priority == p and not r.ok),
            "ttft_s": distribution([r.ttft for r in done if r.priority == p])}
            for p in priorities}
    if slo is not None:
        good = sum(1 for r in results if slo.met(r))
        report["slo"] = slo.describe()
        report["goodput"] = good / duration if duration > 0 else math.nan
        report["slo_attainment"] = good / len(results) if results else math.nan
    return report


def result_dicts(results: list[RequestResult]) -> list[dict]:
    return [asdict(r) | {"tpot": r.tpot} for r in results]
