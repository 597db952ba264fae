"""A sweep's tables (markdown) and plots (PNG, one per workload)."""

import math
from pathlib import Path

ATTAINMENT_GOAL = 0.9  # DistServe's goodput: the highest rate with >= 90% SLO attainment


def _by(runs: list[dict], workload: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r["workload"] == workload:
            out.setdefault(r["config"], []).append(r)
    for series in out.values():
        series.sort(key=lambda r: r["request_rate"])
    return out


def max_rate_meeting_slo(series: list[dict]) -> float | None:
    """Highest swept rate at which SLO attainment is at least the goal (and at every
    lower rate too); None when even the lowest misses."""
    best = None
    for r in series:
        if r["slo_attainment"] < ATTAINMENT_GOAL:
            break
        best = r["request_rate"]
    return best


def _ms(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.0f}"


def _turn_table(series: dict[str, list[dict]]) -> list[str]:
    """TTFT p50 of each turn of the conversations, where runs have turns."""
    turns = sorted({int(t) for rs in series.values() for r in rs
                    for t in r.get("ttft_by_turn_s", {})})
    if not turns:
        return []
    lines = ["TTFT p50 by turn of the conversations, and of all turns after the first "
             "together (ms); the share of prompt tokens served from a prefix cache:", "",
             "| config | rate | " + " | ".join(f"turn {t}" for t in turns)
             + " | turns 2+ | cached |",
             "|" + " --- |" * (len(turns) + 4)]
    for config, rs in series.items():
        for r in rs:
            by_turn = r.get("ttft_by_turn_s", {})
            cells = [_ms(by_turn[str(t)]["p50"]) if str(t) in by_turn else "-" for t in turns]
            later = r.get("ttft_later_turns_s") or {}
            share = r.get("cached_tokens", 0) / r["prompt_tokens"] if r["prompt_tokens"] else 0
            lines.append(f"| {config} | {r['request_rate']:g} | " + " | ".join(cells)
                         + f" | {_ms(later.get('p50'))} | {share:.0%} |")
    return lines + [""]


def write_tables(runs: list[dict], spec: dict, path: Path) -> None:
    lines = [f"SLO: {spec['slo']} (ms); {spec['num_prompts']} requests per run, Poisson "
             "arrivals; latencies in ms.", ""]
    for workload in spec["workloads"]:
        series = _by(runs, workload)
        if not series:
            continue
        lines += [f"### {workload}", "",
                  "| config | rate req/s | done/failed | req/s | out tok/s | TTFT p50 | "
                  "TTFT p99 | TPOT p50 | TPOT p99 | ITL p99 | SLO met | goodput req/s | "
                  "queue | prefill | KV transfer |",
                  "|" + " --- |" * 15]
        for config, rs in series.items():
            for r in rs:
                ph = r.get("phases") or {}
                lines.append(
                    f"| {config} | {r['request_rate']:g} | {r['completed']}/{r['failed']} | "
                    f"{r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} | "
                    f"{_ms(r['ttft_s']['p50'])} | {_ms(r['ttft_s']['p99'])} | "
                    f"{_ms(r['tpot_s']['p50'])} | {_ms(r['tpot_s']['p99'])} | "
                    f"{_ms(r['itl_s']['p99'])} | {100 * r['slo_attainment']:.0f}% | "
                    f"{r['goodput']:.3f} | {_ms(ph.get('queue'))} | {_ms(ph.get('prefill'))} | "
                    f"{_ms(ph.get('kv_transfer'))} |")
        lines += ["", "Highest rate with at least "
                  f"{ATTAINMENT_GOAL:.0%} of requests within the SLO: " + ", ".join(
                      f"{c} {max_rate_meeting_slo(rs) or 'none'}" for c, rs in series.items()),
                  ""]
        lines += _turn_table(series)
    path.write_text("\n".join(lines) + "\n")


def write_plots(runs: list[dict], spec: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for workload in spec["workloads"]:
        series = _by(runs, workload)
        if not series:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        panels = [("SLO attainment (%)", lambda r: 100 * r["slo_attainment"]),
                  ("p99 TPOT (ms)", lambda r: 1000 * r["tpot_s"]["p99"]),
                  ("p99 TTFT (ms)", lambda r: 1000 * r["ttft_s"]["p99"])]
        for ax, (label, value) in zip(axes, panels, strict=True):
            for config, rs in series.items():
                ax.plot([r["request_rate"] for r in rs], [value(r) for r in rs],
                        marker="o", label=config)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].set_ylim(-5, 105)
        axes[0].legend()
        fig.suptitle(f"{workload}: SLO {spec['slo']} ms")
        fig.tight_layout()
        fig.savefig(out / f"{workload}.png", dpi=110)
        plt.close(fig)
