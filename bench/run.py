"""Benchmark echo-scp against stock pynetdicom echoscp and DCMTK storescp, side by side.

Usage: ``.venv/bin/python bench/run.py [--quick] [--rounds N] [--servers a,b]``.
Each round starts every server fresh (in a rotating order, so none is always
first), measures it, and stops it; the report gives the median and range
over rounds and ratios to stock echoscp. The Markdown report goes to stdout,
progress to stderr, everything to bench/results/<timestamp>.json.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import floor
import loadgen
import procstat
import report
import servers

RESULTS = Path(__file__).resolve().parent / "results"
# Fewer clock ticks of server CPU than this and "CPU per operation" is not reported.
MIN_CPU_TICKS = 5


@dataclass(frozen=True)
class Config:
    """Everything a run's numbers depend on; recorded in the JSON next to them."""

    rounds: int
    duration: float  # seconds of each throughput measurement
    idle_window: float  # seconds over which idle CPU is sampled
    clients: tuple[int, ...]
    idle_levels: tuple[int, ...]
    timeout: float  # per socket operation
    idle_open_timeout: float  # per batch of idle associations
    idle_open_budget: float  # per idle level
    processes: int  # generator worker processes for concurrent clients
    warmup: float
    settle: float  # pause after start, after load, after opening idle associations
    servers: tuple[str, ...]
    venv: str  # the virtualenv echo-scp and stock echoscp run from


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round of everything (~1 min)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per throughput measurement (2, quick 0.75)")
    parser.add_argument("--idle-window", type=float, help="seconds per idle CPU sample (2, quick 1)")
    parser.add_argument("--clients", default="8,32", help="concurrent client counts (default 8,32)")
    parser.add_argument("--idle-levels", default="0,10,50,500", help="idle association counts")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-operation timeout, seconds (5)")
    parser.add_argument(
        "--idle-open-timeout", type=float, default=3.0, help="seconds for a batch of idle associations (3)"
    )
    parser.add_argument(
        "--idle-open-budget", type=float, help="seconds to open each idle level (10, quick 6)"
    )
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 2, help="generator processes (default: CPU count)"
    )
    parser.add_argument(
        "--servers",
        default=",".join(servers.SPECS),
        help=f"comma-separated subset of {','.join(servers.SPECS)}",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        help="virtualenv the Python servers run from (default: .venv/runtime, which `make bench` builds "
        "with the runtime dependencies only, else this interpreter's)",
    )
    args = parser.parse_args(argv)
    try:
        clients = tuple(int(part) for part in args.clients.split(",") if part)
        idle_levels = tuple(sorted(int(part) for part in args.idle_levels.split(",") if part))
    except ValueError:
        parser.error("--clients and --idle-levels take comma-separated integers")
    if not all(1 <= count <= 1000 for count in clients):
        parser.error("--clients: each count must be between 1 and 1000")
    if not all(0 <= level <= 5000 for level in idle_levels):
        parser.error("--idle-levels: each level must be between 0 and 5000")
    for name in ("duration", "idle_window", "idle_open_budget"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 600:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 600] seconds")
    if not 0 < args.timeout <= 60 or not 0 < args.idle_open_timeout <= 60:
        parser.error("--timeout and --idle-open-timeout must be in (0, 60] seconds")
    names = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    unknown = [name for name in names if name not in servers.SPECS]
    if unknown or not names:
        parser.error(f"unknown server(s) {unknown}; choose from {', '.join(servers.SPECS)}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if not 1 <= rounds <= 50:
        parser.error("--rounds must be between 1 and 50")

    def pick(given: float | None, normal: float, quick: float) -> float:
        return given if given is not None else (quick if args.quick else normal)

    return Config(
        rounds=rounds,
        duration=pick(args.duration, 2.0, 0.75),
        idle_window=pick(args.idle_window, 2.0, 1.0),
        clients=clients,
        idle_levels=idle_levels,
        timeout=args.timeout,
        idle_open_timeout=args.idle_open_timeout,
        idle_open_budget=pick(args.idle_open_budget, 10.0, 6.0),
        processes=max(1, min(args.processes, 64)),
        warmup=pick(None, 0.3, 0.2),
        settle=pick(None, 0.5, 0.3),
        servers=names,
        venv=str((args.venv or servers.default_venv()).absolute()),
    )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarise_run(result: loadgen.RunResult) -> dict[str, Any]:
    """The numbers kept from one measurement (latency lists are reduced to percentiles)."""
    latencies = sorted(result.latencies)
    ops = result.ok
    out: dict[str, Any] = {
        "ok": ops,
        "failures": result.failures,
        "errors": dict(result.errors),
        "unfinished": result.unfinished,
        "oldest_unfinished_ms": result.oldest_unfinished * 1e3,
        "elapsed_seconds": result.elapsed,
        "rate": result.rate,
        "generator_processes": result.generator_processes,
        "generator_cpu_seconds": result.generator_cpu,
        "generator_cpu_us_per_op": result.generator_cpu / ops * 1e6 if ops else None,
        "generator_busy_percent": (
            100 * result.generator_cpu / (result.elapsed * result.generator_processes)
            if result.elapsed
            else None
        ),
    }
    if latencies:
        out |= {
            "p50_ms": report.percentile(latencies, 0.50) * 1e3,
            "p99_ms": report.percentile(latencies, 0.99) * 1e3,
            "max_ms": latencies[-1] * 1e3,
        }
    if result.server_cpu is not None:
        # Below a few clock ticks the per-operation figure is mostly rounding.
        measurable = result.server_cpu >= MIN_CPU_TICKS * procstat.TICK_SECONDS
        out |= {
            "server_cpu_seconds": result.server_cpu,
            "server_cpu_percent": 100 * result.server_cpu / result.elapsed if result.elapsed else None,
            "server_cpu_us_per_op": result.server_cpu / ops * 1e6 if ops and measurable else None,
        }
    return out


def idle_series(server: servers.RunningServer, config: Config) -> list[dict[str, Any]]:
    """Server CPU, RSS and threads with each number of idle associations open.

    A level that opened nothing new (the server takes no more) reuses the
    previous level's CPU sample instead of spending another window on it.
    """
    steps: list[dict[str, Any]] = []
    with loadgen.IdleAssociations(
        server.target, timeout=config.idle_open_timeout, budget=config.idle_open_budget
    ) as idle:
        for level in config.idle_levels:
            began = time.monotonic()
            idle.grow_to(level)
            open_seconds = time.monotonic() - began
            server.check_alive()
            step: dict[str, Any] = {
                "level": level,
                "opened": idle.opened,
                "failed": idle.errors.total(),
                "not_attempted": idle.not_attempted,
                "errors": dict(idle.errors),
                "open_seconds": open_seconds,
            }
            if steps and steps[-1]["opened"] == idle.opened:
                step["cpu_percent"] = steps[-1]["cpu_percent"]
                step["cpu_sampled_at_level"] = steps[-1]["cpu_sampled_at_level"]
            else:
                time.sleep(config.settle)
                cpu_before, window_began = server.cpu_seconds(), time.monotonic()
                time.sleep(config.idle_window)
                cpu_after, window_ended = server.cpu_seconds(), time.monotonic()
                step["cpu_percent"] = 100 * (cpu_after - cpu_before) / (window_ended - window_began)
                step["cpu_sampled_at_level"] = level
            step["rss_bytes"] = server.rss_bytes()
            step["threads"] = server.threads()
            steps.append(step)
            progress(
                f"    idle {level}: opened {idle.opened} in {open_seconds:.2f} s, "
                f"CPU {step['cpu_percent']:.1f} %, RSS {step['rss_bytes'] / 2**20:.1f} MiB"
            )
    return steps


def measure(reaper: servers.Reaper, spec: servers.ServerSpec, config: Config) -> dict[str, Any]:
    """Start one server, take every measurement of one round, stop it."""
    record: dict[str, Any] = {"server": spec.name}
    server = reaper.start(spec)
    try:
        record["ready"] = servers.wait_ready(server)
        progress(f"  {spec.name} (pid {server.pid}, port {server.port}): ready {record['ready']}")
        time.sleep(config.settle)
        record["rest"] = {"rss_bytes": server.rss_bytes(), "threads": server.threads()}
        target = server.target
        # The floor is measured now, in this (otherwise idle) process, so that the
        # server's CPU per association can be read as a multiple of it.
        record["floor"] = floor.measure()
        loadgen.sequential_associations(target, duration=config.warmup, timeout=config.timeout)
        run = loadgen.sequential_associations(
            target, duration=config.duration, timeout=config.timeout, server_cpu=server.cpu_seconds
        )
        record["sequential"] = summarise_run(run)
        progress(f"    sequential: {run.rate:,.0f}/s, {run.failures} failures")
        server.check_alive()
        run = loadgen.echoes_in_one_association(
            target, duration=config.duration, timeout=config.timeout, server_cpu=server.cpu_seconds
        )
        record["in_association"] = summarise_run(run)
        progress(f"    in one association: {run.rate:,.0f} C-ECHO/s, {run.failures} failures")
        for clients in config.clients:
            server.check_alive()
            run = loadgen.concurrent_associations(
                target,
                clients=clients,
                duration=config.duration,
                timeout=config.timeout,
                processes=config.processes,
                server_cpu=server.cpu_seconds,
            )
            record[f"clients_{clients}"] = summarise_run(run)
            progress(f"    {clients} clients: {run.rate:,.0f}/s, {run.failures} failures {dict(run.errors)}")
        server.check_alive()
        # Associations of the load tests may still be winding down in the server.
        time.sleep(config.settle)
        record["idle"] = idle_series(server, config)
        server.check_alive()
    except servers.ServerFailed as exc:
        record["error"] = str(exc)
        progress(f"    FAILED: {exc}")
    finally:
        record["stop"] = reaper.stop(server)
        record["log_tail"] = server.log_tail(5)
        record["log_lines"] = len(server.log_path.read_text(errors="replace").splitlines())
    return record


def generator_ceiling(rounds: Sequence[dict[str, dict[str, Any]]], config: Config) -> dict[str, Any]:
    """How fast the generator itself can go, judged on the fastest server (DCMTK with TCP_NODELAY=1)."""
    reference = "storescp-nodelay" if "storescp-nodelay" in config.servers else config.servers[0]
    records = [by_server[reference] for by_server in rounds if reference in by_server]
    sections = ["sequential", *(f"clients_{count}" for count in config.clients)]
    out: dict[str, Any] = {"reference_server": reference, "sections": {}}
    best = 0.0
    for section in sections:
        runs = [record[section] for record in records if section in record]
        if not runs:
            continue
        cpu_per_op = [run["generator_cpu_us_per_op"] for run in runs if run.get("generator_cpu_us_per_op")]
        busy = [
            run["generator_busy_percent"] for run in runs if run.get("generator_busy_percent") is not None
        ]
        rates = [run["rate"] for run in runs]
        best = max(best, *rates)
        per_op = sorted(cpu_per_op)[len(cpu_per_op) // 2] if cpu_per_op else None
        out["sections"][section] = {
            "best_rate": max(rates),
            "generator_cpu_us_per_association": per_op,
            "ceiling_per_core": 1e6 / per_op if per_op else None,
            "generator_busy_percent_max": max(busy) if busy else None,
        }
    out["best_rate"] = best
    out["reaches_thousands"] = best >= 1000
    return out


def ceiling_text(ceiling: dict[str, Any], config: Config) -> str:
    lines = [
        f"Generator ceiling (measured against `{ceiling['reference_server']}`; CPU includes the kernel's "
        "loopback TCP work done in the generator's own system calls):",
        "",
    ]
    for section, data in ceiling["sections"].items():
        per_op = data["generator_cpu_us_per_association"]
        who = "1 blocking client" if section == "sequential" else f"{section.split('_')[1]} clients"
        procs = 1 if section == "sequential" else min(config.processes, int(section.split("_")[1]))
        text = f"- {who} ({procs} process{'es' if procs > 1 else ''}): best {data['best_rate']:,.0f} assoc/s"
        if per_op:
            text += (
                f"; generator CPU {per_op:.0f} µs/association → ceiling ≈ {data['ceiling_per_core']:,.0f} "
                f"assoc/s per core; generator busy at most {data['generator_busy_percent_max']:.0f} % "
                "of its processes' time"
            )
        lines.append(text)
    if ceiling["reaches_thousands"]:
        lines.append(
            f"- The generator reaches {ceiling['best_rate']:,.0f} associations/s, so it is not what limits "
            "servers slower than that."
        )
    else:
        lines.append(
            f"- WARNING: the generator reached only {ceiling['best_rate']:,.0f} associations/s against "
            f"`{ceiling['reference_server']}`: the machine is shared and has {os.cpu_count()} cores, "
            "which the generator, the server and the kernel's loopback TCP all compete for."
        )
    return "\n".join(lines)


def _version(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _venv_packages(venv: Path) -> list[str]:
    """``name==version`` of every distribution in ``venv`` (what the Python servers could import)."""
    found = []
    for site in sorted(venv.glob("lib/python*/site-packages")):
        for dist in metadata.distributions(path=[str(site)]):
            found.append(f"{dist.metadata['Name']}=={dist.version}")
    return sorted(set(found), key=str.lower)


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    # Turns SIGTERM/SIGHUP into an exception so every finally (and the Reaper) runs.
    raise SystemExit(128 + signum)


def _raise_file_limit(needed: int) -> None:
    # Each idle association is a descriptor; distributions often default to 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    _raise_file_limit(max(config.idle_levels, default=0) + 1024)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_system_exit)
    began = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta: dict[str, Any] = {
        "timestamp": stamp,
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "echo_scp": _package("echo-scp"),
        "pynetdicom": _package("pynetdicom"),
        "venv": config.venv,
        "venv_packages": _venv_packages(Path(config.venv)),
        "bytecode": servers.describe_bytecode(Path(config.venv)),
        "dcmtk": _version([servers.DCMTK_STORESCP, "--version"]),
        "servers": {name: servers.SPECS[name].description for name in config.servers},
    }
    rounds: list[dict[str, dict[str, Any]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="echo-scp-bench-") as work,
        servers.Reaper(Path(work), Path(config.venv)) as reaper,
    ):
        for name in config.servers:
            reaper.warm_up(servers.SPECS[name])
        for index in range(config.rounds):
            shift = index % len(config.servers)
            order = config.servers[shift:] + config.servers[:shift]
            progress(f"round {index + 1}/{config.rounds}: {', '.join(order)}")
            rounds.append({name: measure(reaper, servers.SPECS[name], config) for name in order})
    meta["load_average_after"] = os.getloadavg()
    meta["wall_seconds"] = time.monotonic() - began

    rows = report.metrics(config.clients, config.idle_levels)
    names = list(config.servers)
    baseline = servers.BASELINE if servers.BASELINE in names else names[0]
    summary = report.summarise(rounds, names, rows)
    ratio = report.ratios(summary, names, baseline)
    ceiling = generator_ceiling(rounds, config)
    errors = {
        f"round {index + 1} {name}": record["error"]
        for index, by_server in enumerate(rounds)
        for name, record in by_server.items()
        if "error" in record
    }

    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"{stamp}.json"
    document = {
        "meta": meta,
        "config": asdict(config),
        "summary": summary,
        "ratios_to_baseline": {"baseline": baseline, "ratios": ratio},
        "generator": ceiling,
        "rounds": rounds,
        "errors": errors,
    }
    out_path.write_text(json.dumps(document, indent=2, default=str) + "\n")

    load_before = " ".join(f"{value:.2f}" for value in meta["load_average_before"])
    load_after = " ".join(f"{value:.2f}" for value in meta["load_average_after"])
    print(f"# echo-scp benchmark {stamp}\n")
    print(
        f"{config.rounds} round(s), {config.duration:g} s per throughput measurement, "
        f"{config.idle_window:g} s idle windows, per-operation timeout {config.timeout:g} s; "
        f"{meta['cpu_count']} CPUs, load average {load_before} before and {load_after} after; "
        f"Python {meta['python']}, pynetdicom {meta['pynetdicom']}, {meta['dcmtk']}; "
        f"{meta['wall_seconds']:.0f} s in all.\n"
    )
    print(f"Python servers run from `{config.venv}`: {', '.join(meta['venv_packages'])}.")
    print(f"Their bytecode: {meta['bytecode']}.\n")
    print("Cells: median over rounds (min-max). Servers:\n")
    for name, description in meta["servers"].items():
        print(f"- `{name}`: {description}")
    print()
    print(report.markdown_tables(summary, ratio, rows, names, baseline))
    print()
    print(ceiling_text(ceiling, config))
    if errors:
        print("\nErrors:\n")
        for where, message in errors.items():
            print(f"- {where}: {message.splitlines()[0]}")
    print(f"\nJSON: {out_path.relative_to(servers.REPO)}")
    return 1 if errors else 0


def entry() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        # The Reaper has already stopped every server on the way out.
        progress("interrupted; every server was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(entry())
