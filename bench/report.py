"""A run's report as a terminal table."""

import math


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1000:.1f}"


def _num(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def format_report(report: dict) -> str:
    lines = [
        f"{'completed / failed':<28}{report['completed']} / {report['failed']}",
        f"{'duration (s)':<28}{_num(report['duration_s'])}",
        f"{'request throughput (req/s)':<28}{_num(report['request_throughput'], 3)}",
        f"{'output tokens/s':<28}{_num(report['output_token_throughput'], 1)}",
        f"{'total tokens/s':<28}{_num(report['total_token_throughput'], 1)}",
    ]
    if "goodput" in report:
        lines.append(f"{'goodput (req/s, ' + report['slo'] + ')':<28}"
                     f"{_num(report['goodput'], 3)}  "
                     f"(SLO attainment {_num(100 * report['slo_attainment'], 1)}%)")
    lines.append("")
    lines.append(f"{'ms':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                       ("e2e_s", "E2E")):
        d = report[key]
        lines.append(f"{label:<10}" + "".join(f"{_ms(d[p]):>10}"
                                                for p in ("mean", "p50", "p90", "p99")))
    by_turn = report.get("ttft_by_turn_s")
    if by_turn:
        lines.append("")
        lines.append(f"{'TTFT, turn':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
        for turn, d in by_turn.items():
            lines.append(f"{turn:<10}" + "".join(f"{_ms(d[p]):>10}"
                                                 for p in ("mean", "p50", "p90", "p99")))
        lines.append(f"prompt tokens served from a prefix cache: {report['cached_tokens']} "
                     f"of {report['prompt_tokens']}")
    by_priority = report.get("by_priority")
    if by_priority:
        lines.append("")
        lines.append(f"{'TTFT, prio':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
                     f"{'done':>8}{'failed':>8}")
        for priority, row in by_priority.items():
            d = row["ttft_s"]
            lines.append(f"{priority:<10}" + "".join(f"{_ms(d[p]):>10}"
                                                     for p in ("mean", "p50", "p90", "p99"))
                         + f"{row['completed']:>8}{row['failed']:>8}")
    phases = report.get("phases")
    if phases:
        lines.append("")
        lines.append("server-side means per request (ms): " + ", ".join(
            f"{k} {_ms(v)}" for k, v in phases.items()))
    return "\n".join(lines)
