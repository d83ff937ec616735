"""CPU time and resident memory of a process, read from /proc (Linux only)."""

from __future__ import annotations

import os

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The resolution of cpu_seconds(): one clock tick, usually 10 ms.
TICK_SECONDS = 1 / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far, all threads, at tick resolution (10 ms).

    Children are not included: none of the servers under test forks per
    association in the configurations benchmarked.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        text = stat.read()
    # The command name (field 2) may contain spaces; the fields after it are plain.
    fields = text.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes, or 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def thread_count(pid: int) -> int:
    """Threads of ``pid``: pynetdicom runs two or three per association."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0
