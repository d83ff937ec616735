"""Soak: mixed good and hostile traffic against one daemon, sampling threads, descriptors and RSS.

Not part of the test suite. Usage::

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --duration 60   # a quick look

The daemon runs as a child process with a plain and a TLS listener on
127.0.0.1, from ``--venv`` (default ``.venv/runtime``, built as the image is,
when it exists). Worker threads send, in a loop and at a bounded rate: good C-ECHOs,
associations rejected for a wrong AE title, associations the peer aborts,
connections reset in the middle of an association, TLS handshakes that fail
(plain DICOM to the TLS port, a client certificate from an unknown CA),
connections that never send anything, and good TLS C-ECHOs. Every sample
interval the daemon's thread count, open descriptors and RSS are read from
/proc. At the end the first and last fifths of the run are compared: growth
must be flat.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(REPO))  # for tests/wire.py

from tests import wire  # noqa: E402

import servers  # noqa: E402
from echo_scp import scu  # noqa: E402

AET = "ECHOSCP"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certs(folder: Path) -> dict[str, Path]:
    import trustme

    ca, stranger_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    stranger = stranger_ca.issue_cert("stranger")
    files = {
        name: folder / name for name in ("ca.pem", "cert.pem", "key.pem", "stranger.pem", "stranger.key")
    }
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    files["cert.pem"].write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(files["key.pem"]))
    files["stranger.pem"].write_bytes(b"".join(b.bytes() for b in stranger.cert_chain_pems))
    stranger.private_key_pem.write_to_path(str(files["stranger.key"]))
    return files


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "threads": int(fields["Threads"].strip()),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
    }


class Traffic:
    """The mix of peers, each a function run in a loop by a worker thread."""

    def __init__(self, port: int, tls_port: int, certs: dict[str, Path]) -> None:
        self.port, self.tls_port = port, tls_port
        self.trusting = scu.client_ssl_context(ca_file=str(certs["ca.pem"]))
        self.stranger = scu.client_ssl_context(
            ca_file=str(certs["ca.pem"]),
            cert_file=str(certs["stranger.pem"]),
            key_file=str(certs["stranger.key"]),
        )
        self.counts: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _note(self, kind: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self.counts[kind] += 1
            if not ok:
                self.unexpected[f"{kind}: {detail}"[:120]] += 1

    def good(self) -> None:
        try:
            result = scu.echo_association("127.0.0.1", self.port, called_aet=AET, repeat=2, acse_timeout=10)
            self._note("good_echo", result.ok, "status")
        except scu.EchoError as exc:
            self._note("good_echo", False, str(exc))

    def good_tls(self) -> None:
        try:
            result = scu.echo_association(
                "127.0.0.1",
                self.tls_port,
                called_aet=AET,
                ssl_context=self.trusting,
                server_hostname="localhost",
            )
            self._note("good_tls_echo", result.ok, "status")
        except scu.EchoError as exc:
            self._note("good_tls_echo", False, str(exc))

    def rejected(self) -> None:
        try:
            scu.echo_association("127.0.0.1", self.port, called_aet="WRONG_AE", acse_timeout=10)
            self._note("rejection", False, "was accepted")
        except scu.AssociationRejected:
            self._note("rejection", True)
        except scu.EchoError as exc:
            self._note("rejection", False, str(exc))

    def aborted(self) -> None:
        try:
            scu.echo_association("127.0.0.1", self.port, called_aet=AET, abort=True, acse_timeout=10)
            self._note("peer_abort", True)
        except scu.EchoError as exc:
            self._note("peer_abort", False, str(exc))

    def reset(self) -> None:
        rq = wire.associate_rq(AET, "RESETTER")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(rq)
                sock.recv(4096)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._note("reset", True)
        except OSError as exc:
            self._note("reset", False, str(exc))

    def tls_failure(self) -> None:
        try:
            scu.echo_association("127.0.0.1", self.tls_port, called_aet=AET, acse_timeout=3)
            self._note("plain_to_tls", False, "succeeded")
        except scu.EchoError:
            self._note("plain_to_tls", True)
        try:
            scu.echo_association(
                "127.0.0.1",
                self.tls_port,
                called_aet=AET,
                ssl_context=self.stranger,
                server_hostname="localhost",
            )
            self._note("untrusted_client_cert", False, "succeeded")
        except scu.EchoError:
            self._note("untrusted_client_cert", True)

    def silent(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                time.sleep(1.0)  # holds a half-open connection for a second, then leaves
                sock.close()
            self._note("silent", True)
        except OSError as exc:
            self._note("silent", False, str(exc))


def worker(action: Callable[[], None], stop: threading.Event, pause: float) -> None:
    while not stop.is_set():
        action()
        stop.wait(pause)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the samples to this file")
    parser.add_argument(
        "--venv",
        type=Path,
        help="virtualenv the daemon runs from (default: .venv/runtime, built as the image is, when it "
        "exists, else this interpreter's)",
    )
    args = parser.parse_args(argv)
    venv = (args.venv or servers.default_venv()).absolute()

    folder = Path(tempfile.mkdtemp(prefix="echo-scp-soak-"))
    certs = make_certs(folder)
    port, tls_port, http_port = free_port(), free_port(), free_port()
    listeners = [
        {"name": "dicom", "host": "127.0.0.1", "port": port, "ae_title": AET},
        {
            "name": "dicom-tls",
            "host": "127.0.0.1",
            "port": tls_port,
            "ae_title": AET,
            "tls": {
                "cert_file": str(certs["cert.pem"]),
                "key_file": str(certs["key.pem"]),
                "ca_file": str(certs["ca.pem"]),
                "client_certificates": "optional",
            },
        },
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
    env.update(
        ECHO_SCP_LISTENERS=json.dumps(listeners),
        ECHO_SCP_HTTP__HOST="127.0.0.1",
        ECHO_SCP_HTTP__PORT=str(http_port),
        ECHO_SCP_LOG__LEVEL="warning",
    )
    daemon = subprocess.Popen(
        [
            str(venv / "bin" / "echo-scp"),
            "serve",
            "--config",
            str(REPO / "tests" / "empty.toml"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("daemon did not become ready")
            time.sleep(0.2)
        traffic = Traffic(port, tls_port, certs)
        plan = [
            (traffic.good, 0.02),
            (traffic.good, 0.05),
            (traffic.good_tls, 0.1),
            (traffic.rejected, 0.1),
            (traffic.aborted, 0.1),
            (traffic.reset, 0.1),
            (traffic.tls_failure, 0.2),
            (traffic.silent, 0.5),
        ]
        threads = [threading.Thread(target=worker, args=(a, stop, p), daemon=True) for a, p in plan]
        started = time.monotonic()
        samples = [{"t": 0.0, **proc_sample(daemon.pid)}]
        for thread in threads:
            thread.start()
        print(f"soak: {args.duration:.0f} s of mixed traffic against pid {daemon.pid}, running from {venv}")
        print(f"{'t (s)':>7} {'threads':>8} {'fds':>6} {'RSS MB':>8} {'requests':>9}")
        while time.monotonic() - started < args.duration and daemon.poll() is None:
            time.sleep(min(args.interval, args.duration - (time.monotonic() - started)))
            sample = {"t": round(time.monotonic() - started, 1), **proc_sample(daemon.pid)}
            samples.append(sample)
            total = sum(traffic.counts.values())
            t, n_threads, fds, rss = sample["t"], sample["threads"], sample["fds"], sample["rss_mb"]
            print(f"{t:>7} {n_threads:>8} {fds:>6} {rss:>8.1f} {total:>9}")
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        # Let the last connections finish (ARTIM and idle timers) before the final sample.
        settle = time.monotonic() + 40
        final = {"t": round(time.monotonic() - started, 1), **proc_sample(daemon.pid)}
        while time.monotonic() < settle and final["threads"] > samples[0]["threads"] + 2:
            time.sleep(1)
            final = {"t": round(time.monotonic() - started, 1), **proc_sample(daemon.pid)}
        samples.append(final)
        alive = daemon.poll() is None
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
    fifth = max(1, len(samples) // 5)
    verdict = {}
    for key in ("threads", "fds", "rss_mb"):
        early = statistics.median(s[key] for s in samples[1 : 1 + fifth] or samples[:1])
        late = statistics.median(s[key] for s in samples[-fifth - 1 : -1] or samples[-1:])
        verdict[key] = (early, late, final[key])
    print("\nrequests by kind:", dict(traffic.counts))
    print("unexpected outcomes:", dict(traffic.unexpected) or "none")
    print(f"daemon alive at the end: {alive}; exit status after SIGTERM: {daemon.returncode}")
    print(f"\n{'':8} {'at rest':>12} {'first fifth':>12} {'last fifth':>12} {'after idle':>12}")
    for key, (early, late, after) in verdict.items():
        print(f"{key:8} {samples[0][key]:>12.1f} {early:>12.1f} {late:>12.1f} {after:>12.1f}")
    rss_growth = verdict["rss_mb"][1] - verdict["rss_mb"][0]
    flat = (
        alive
        and verdict["threads"][2] <= samples[0]["threads"] + 2
        and verdict["fds"][2] <= samples[0]["fds"] + 2
        and rss_growth < 10
        and not traffic.unexpected
    )
    verdict_word = "FLAT" if flat else "GROWING OR FAILING"
    print(f"\nRSS growth first->last fifth: {rss_growth:+.1f} MB; verdict: {verdict_word}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "counts": dict(traffic.counts)}, indent=1))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
