"""Turn per-round measurements into medians, ranges, ratios and a Markdown report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 < fraction <= 1)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def _get(record: Record, *path: str) -> float | None:
    node: Any = record
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _idle(level: int, field: str) -> Callable[[Record], float | None]:
    def extract(record: Record) -> float | None:
        for step in record.get("idle", []):
            if step.get("level") == level:
                value = step.get(field)
                return float(value) if isinstance(value, int | float) else None
        return None

    return extract


@dataclass(frozen=True)
class Metric:
    """One row of the report: how to read it from a server's record of one round."""

    key: str
    label: str
    better: str  # "higher", "lower" or "" (informational)
    extract: Callable[[Record], float | None]


def _field(*path: str) -> Callable[[Record], float | None]:
    return lambda record: _get(record, *path)


def _floor_multiple(record: Record) -> float | None:
    cpu, floor = _get(record, "sequential", "server_cpu_us_per_op"), _get(record, "floor", "negotiation_us")
    return cpu / floor if cpu is not None and floor else None


def _mib_of(extract: Callable[[Record], float | None]) -> Callable[[Record], float | None]:
    def mib(record: Record) -> float | None:
        value = extract(record)
        return None if value is None else value / (1024 * 1024)

    return mib


def metrics(clients: Sequence[int], idle_levels: Sequence[int]) -> list[Metric]:
    """The report's rows, numbered after the brief's measurements."""
    rows = [
        Metric("seq_rate", "1. sequential associations/s (1 client)", "higher", _field("sequential", "rate")),
        Metric(
            "seq_p50", "1. sequential: p50 association latency (ms)", "lower", _field("sequential", "p50_ms")
        ),
        Metric("seq_failures", "1. sequential: failures", "lower", _field("sequential", "failures")),
        Metric("echo_rate", "2. C-ECHO/s inside one association", "higher", _field("in_association", "rate")),
    ]
    for count in clients:
        section = f"clients_{count}"
        label = f"3. {count} clients:"
        rows += [
            Metric(f"c{count}_rate", f"{label} associations/s", "higher", _field(section, "rate")),
            Metric(f"c{count}_p50", f"{label} p50 latency (ms)", "lower", _field(section, "p50_ms")),
            Metric(f"c{count}_p99", f"{label} p99 latency (ms)", "lower", _field(section, "p99_ms")),
            Metric(f"c{count}_max", f"{label} max latency (ms)", "lower", _field(section, "max_ms")),
            Metric(f"c{count}_failures", f"{label} failures", "lower", _field(section, "failures")),
            Metric(
                f"c{count}_server_cpu",
                f"{label} server CPU % (100 = one core)",
                "",
                _field(section, "server_cpu_percent"),
            ),
        ]
    for level in idle_levels:
        rows.append(
            Metric(f"idle{level}_cpu", f"4. server CPU % with {level} idle associations", "lower",
                   _idle(level, "cpu_percent"))
        )  # fmt: skip
        if level:
            rows.append(
                Metric(f"idle{level}_opened", f"4. idle associations opened of {level}", "higher",
                       _idle(level, "opened"))
            )  # fmt: skip
    top = max(idle_levels) if idle_levels else 0
    rows += [
        Metric("cpu_per_assoc", "5. server CPU µs per association (from 1.)", "lower",
               _field("sequential", "server_cpu_us_per_op")),
        Metric("cpu_per_echo", "5. server CPU µs per C-ECHO (from 2.)", "lower",
               _field("in_association", "server_cpu_us_per_op")),
        Metric("floor", "5. codec floor µs per association (RQ decode, negotiation, AC encode)",
               "", _field("floor", "negotiation_us")),
        Metric("floor_exchange", "5. exchange floor µs per association (+ P-DATA, A-RELEASE PDUs)",
               "", _field("floor", "exchange_us")),
        Metric("cpu_floor_multiple", "5. server CPU per association / codec floor (x)", "lower",
               _floor_multiple),
        Metric("rss_rest", "6. RSS at rest (MiB)", "lower", _mib_of(_field("rest", "rss_bytes"))),
        Metric(f"rss_idle{top}", f"6. RSS with {top} idle associations attempted (MiB)", "lower",
               _mib_of(_idle(top, "rss_bytes"))),
        Metric("ready_echo", "7. start → first successful C-ECHO (s)", "lower",
               _field("ready", "first_echo_seconds")),
        Metric("ready_http", "7. start → /readyz 200 (s)", "lower", _field("ready", "readyz_seconds")),
    ]  # fmt: skip
    return rows


def summarise(
    rounds: Sequence[dict[str, Record]], names: Sequence[str], rows: Sequence[Metric]
) -> dict[str, dict[str, dict[str, Any]]]:
    """metric key -> server -> {median, min, max, values}, skipping rounds without a value."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in rows:
        per_server: dict[str, dict[str, Any]] = {}
        for name in names:
            values = [
                value
                for by_server in rounds
                if name in by_server and (value := metric.extract(by_server[name])) is not None
            ]
            if values:
                per_server[name] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                }
        summary[metric.key] = per_server
    return summary


def ratios(
    summary: dict[str, dict[str, dict[str, Any]]], names: Sequence[str], baseline: str
) -> dict[str, dict[str, float | None]]:
    """metric key -> server -> median / baseline median (None when undefined)."""
    result: dict[str, dict[str, float | None]] = {}
    for key, per_server in summary.items():
        base = per_server.get(baseline, {}).get("median")
        result[key] = {
            name: (per_server[name]["median"] / base if base and name in per_server else None)
            for name in names
        }
    return result


def number(value: float) -> str:
    """Three significant figures, thousands separated, no exponent."""
    if value != value:  # NaN
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    text = number(entry["median"])
    if len(entry["values"]) > 1:
        text += f" ({number(entry['min'])}-{number(entry['max'])})"
    return text


def markdown_tables(
    summary: dict[str, dict[str, dict[str, Any]]],
    ratio: dict[str, dict[str, float | None]],
    rows: Sequence[Metric],
    names: Sequence[str],
    baseline: str,
) -> str:
    """The results table (median, min-max) and the table of ratios to ``baseline``."""
    lines = [
        "| measurement | better | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for metric in rows:
        cells = [_cell(summary[metric.key].get(name)) for name in names]
        if all(cell == "-" for cell in cells):
            continue
        lines.append(f"| {metric.label} | {metric.better} | " + " | ".join(cells) + " |")
    others = [name for name in names if name != baseline]
    lines += [
        "",
        f"Ratio of medians to stock `{baseline}` (>1 means a larger number; read with the 'better' column):",
        "",
        "| measurement | " + " | ".join(f"{name} / {baseline}" for name in others) + " |",
        "|---|" + "---:|" * len(others),
    ]
    for metric in rows:
        values = [ratio[metric.key].get(name) for name in others]
        if all(value is None for value in values):
            continue
        cells = ["-" if value is None else f"x{number(value)}" for value in values]
        lines.append(f"| {metric.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
