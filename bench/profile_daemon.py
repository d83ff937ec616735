"""Profile a server under load and print the functions it spends its CPU in.

Usage: ``.venv/bin/python bench/profile_daemon.py [--server echo-scp] [--load sequential]``.

With py-spy (``.venv/bin/pip install -r bench/requirements.txt``) the server
is started as in run.py and sampled from outside while the load generator
drives it; py-spy sees every thread and costs the server little. Without
py-spy, or with ``--profiler cprofile``, the daemon runs under
cprofile_threads.py instead, which is slower and inflates Python-heavy code
(but needs no ptrace permission). Either way the top functions by own time
("self") and by time including callees ("total") are printed, plus the
share of each source file. This file is not called profile.py because that
would shadow the standard library's ``profile`` module, which cProfile
imports, for every script run from bench/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import loadgen
import servers

HERE = Path(__file__).resolve().parent
# py-spy flags per --mode.
_MODE_FLAGS = {"gil": ["--gil"], "cpu": [], "wall": ["--idle"]}
_MODE_TEXT = {
    "gil": "samples of the thread holding the GIL",
    "cpu": "samples of threads py-spy judged to be running",
    "wall": "samples of every thread, running or waiting",
}


def drive(server: servers.RunningServer, load: str, duration: float, timeout: float) -> loadgen.RunResult:
    """Put ``load`` on the server for ``duration`` seconds."""
    if load == "echoes":
        return loadgen.echoes_in_one_association(server.target, duration=duration, timeout=timeout)
    if load == "concurrent":
        return loadgen.concurrent_associations(
            server.target, clients=8, duration=duration, timeout=timeout, processes=os.cpu_count() or 2
        )
    return loadgen.sequential_associations(server.target, duration=duration, timeout=timeout)


def read_collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: one ``frame;frame;... count`` line per stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _file_of(frame: str) -> str:
    # A frame reads "function (path/to/file.py)", or "...file.py:123)" with --lines.
    inside = frame.rpartition(" (")[2].rstrip(")")
    if inside.rpartition(":")[2].isdigit():
        inside = inside.rpartition(":")[0]
    parts = Path(inside).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if "python3.11" in parts:
        return "stdlib/" + "/".join(parts[parts.index("python3.11") + 1 :])
    return inside


def print_collapsed(stacks: Counter[tuple[str, ...]], top: int, what: str, possible: int) -> None:
    total = sum(stacks.values())
    if not total:
        print("no samples: was the server busy, and could py-spy attach?")
        return
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = [
            frame for frame in stack if not frame.startswith("process ") and not frame.startswith("thread ")
        ]
        if not frames:
            continue
        own[frames[-1]] += count
        files[_file_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"{total} {what} (one thread at {possible} sampling instants gives {possible}).\n")
    for title, counter in (("self", own), ("total (including callees)", inclusive), ("self, by file", files)):
        print(f"Top {top} by {title}:\n")
        print("| % samples | function (file) |\n|---:|---|")
        for name, count in counter.most_common(top):
            print(f"| {100 * count / total:.1f} | `{name}` |")
        print()


def print_pstats(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    for order in ("tottime", "cumulative"):
        print(f"Top {top} by {order}:\n")
        stats.sort_stats(order).print_stats(top)


def _load_line(result: loadgen.RunResult) -> str:
    rate = f"{result.ok} operations in {result.elapsed:.1f} s ({result.rate:,.0f}/s)"
    return f"{rate}, {result.failures} failures.\n"


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_with_py_spy(args: argparse.Namespace, py_spy: str, work: Path) -> int:
    out = work / "py-spy.txt"
    with servers.Reaper(work) as reaper:
        reaper.warm_up(servers.SPECS[args.server])
        server = reaper.start(servers.SPECS[args.server])
        servers.wait_ready(server)
        command = [py_spy, "record", "--pid", str(server.pid), "--duration", str(int(args.duration) + 1)]
        command += ["--rate", str(args.rate), "--format", "raw", "-o", str(out)]
        if not args.lines:
            command.append("--nolineno")
        command += _MODE_FLAGS[args.mode]
        spy = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            time.sleep(0.5)  # let py-spy attach before the load starts
            result = drive(server, args.load, args.duration, args.timeout)
            output, _ = spy.communicate(timeout=args.duration + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=5)
        if spy.returncode != 0 or not out.exists():
            print(output.decode(errors="replace"), file=sys.stderr)
            print("py-spy failed (it needs ptrace permission); try --profiler cprofile", file=sys.stderr)
            return 1
    print(f"# {args.server} under {args.load} load, sampled by py-spy at {args.rate} Hz ({args.mode} mode)\n")
    print(_load_line(result))
    stacks = read_collapsed(out)
    what = _MODE_TEXT[args.mode]
    if args.only:
        stacks = Counter(
            {stack: n for stack, n in stacks.items() if any(args.only in frame for frame in stack)}
        )
        what += f" whose stack has a frame matching {args.only!r}"
    print_collapsed(stacks, args.top, what, args.rate * (int(args.duration) + 1))
    return 0


def profile_with_cprofile(args: argparse.Namespace, work: Path) -> int:
    if args.server != "echo-scp":
        print("--profiler cprofile only wraps echo-scp", file=sys.stderr)
        return 2
    out = work / "echo-scp.prof"
    base = servers.SPECS["echo-scp"]
    wrapped = dataclasses.replace(
        base,
        command=lambda port, path, bin_dir: [
            str(bin_dir / "python"),
            str(HERE / "cprofile_threads.py"),
            str(out),
            *base.command(port, path, bin_dir)[1:],
        ],
    )
    with servers.Reaper(work) as reaper:
        server = reaper.start(wrapped)
        servers.wait_ready(server)
        result = drive(server, args.load, args.duration, args.timeout)
        # SIGTERM: the daemon returns from main and the wrapper merges and writes
        # the stats of every thread, which takes a while after thousands of them.
        reaper.stop(server, timeout=120)
    if not out.exists():
        print(f"no profile written; the daemon's log:\n{server.log_tail()}", file=sys.stderr)
        return 1
    print(f"# echo-scp under {args.load} load, cProfile in every thread\n")
    print(_load_line(result))
    print_pstats(out, args.top)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=sorted(servers.SPECS), default="echo-scp")
    parser.add_argument("--load", choices=["sequential", "echoes", "concurrent"], default="sequential")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load (8)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-operation timeout (5)")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    parser.add_argument(
        "--mode",
        choices=sorted(_MODE_FLAGS),
        default="gil",
        help="py-spy: gil = the thread holding the GIL (Python CPU, the default); cpu = threads py-spy "
        "thinks are running (its idle detection counts some lock waits); wall = every thread, waiting too",
    )
    parser.add_argument("--top", type=int, default=25, help="rows per table (25)")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="py-spy: keep only stacks with a frame containing TEXT; e.g. with --mode wall, "
        "'serve_forever' keeps echo-scp's reactor ('run_reactor' stock echoscp's association threads) "
        "and drops the daemon's always-waiting ones",
    )
    parser.add_argument("--lines", action="store_true", help="py-spy: keep line numbers in frames")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    py_spy = _py_spy()
    with tempfile.TemporaryDirectory(prefix="echo-scp-profile-") as work:
        if args.profiler == "cprofile" or (args.profiler == "auto" and py_spy is None):
            if py_spy is None:
                print(
                    "py-spy not found (pip install -r bench/requirements.txt); using cProfile",
                    file=sys.stderr,
                )
            return profile_with_cprofile(args, Path(work))
        if py_spy is None:
            parser.error("py-spy not found: .venv/bin/pip install -r bench/requirements.txt")
        return profile_with_py_spy(args, py_spy, Path(work))


if __name__ == "__main__":
    sys.exit(main())
