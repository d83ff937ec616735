"""Run ``echo-scp`` with cProfile in every thread and write the merged stats on exit.

``python -m cProfile`` profiles only the main thread, and in the daemon the
main thread just waits for a signal: the work happens in pynetdicom's
per-association threads. This wrapper gives each thread its own profiler
(installed through ``threading.setprofile``) and merges them when the daemon
returns, so it is the fallback of profile_daemon.py where py-spy cannot
attach. Usage: ``python bench/cprofile_threads.py OUT.prof serve --config ...``.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from types import FrameType
from typing import Any


class ThreadProfiles:
    """One cProfile.Profile per thread, created as each thread starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._profiles: list[cProfile.Profile] = []

    def hook(self, _frame: FrameType, _event: str, _arg: Any) -> None:
        # Called at a new thread's first event; enabling replaces this hook.
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def start_main(self) -> cProfile.Profile:
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()
        return profile

    def dump(self, main: cProfile.Profile, path: str) -> None:
        # The main thread's profiler first: disabling any other from this
        # thread would also switch off the main thread's profiling.
        main.disable()
        with self._lock:
            profiles = list(self._profiles)
        stats = pstats.Stats(main)
        for profile in profiles:
            if profile is not main:
                try:
                    stats.add(profile)
                except TypeError:
                    continue  # a thread that started but never returned from its first call
        stats.dump_stats(path)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: cprofile_threads.py OUT.prof echo-scp-arguments...", file=sys.stderr)
        return 2
    out, daemon_args = argv[0], argv[1:]
    from echo_scp.cli import main as echo_scp_main

    profiles = ThreadProfiles()
    threading.setprofile(profiles.hook)
    main_profile = profiles.start_main()
    try:
        return echo_scp_main(daemon_args)
    finally:
        threading.setprofile(None)
        profiles.dump(main_profile, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
