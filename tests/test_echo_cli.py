"""``echo-scp echo`` against a real daemon, in-process and as the installed console script,
plus the embeddable EchoServer and its ``echo_server`` pytest fixture.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echo_scp import scu
from echo_scp.cli import main as cli_main
from echo_scp.testing import EchoServer
from tests.conftest import free_port, http_get, venv_tool, wait_for

pytestmark = pytest.mark.timeout(60)

SUCCESS_LINE = re.compile(r"^C-ECHO to ECHOSCP@127\.0\.0\.1:\d+: Success \(0x0000\) in \d+\.\d ms$")
# What the probe must never import: the daemon's dependencies each cost more start-up than the whole echo.
HEAVY_MODULES = (
    "pynetdicom",
    "pydicom",
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "structlog",
    "prometheus_client",
    # The standard library's slowest: dataclasses brings inspect, about a third of a probe's start-up.
    "dataclasses",
    "inspect",
)


@dataclass
class Outcome:
    """What one ``echo-scp echo`` run returned and printed."""

    code: int
    out: str
    err: str
    seconds: float


Run = Callable[..., Outcome]


@pytest.fixture(params=["in_process", "console_script"])
def run_echo(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``echo-scp echo ARGS`` through echo_scp.cli.main, or as the installed console script."""
    if request.param == "in_process":

        def run(*args: str) -> Outcome:
            capsys.readouterr()
            started = time.monotonic()
            code = cli_main(["echo", *args])
            seconds = time.monotonic() - started
            captured = capsys.readouterr()
            return Outcome(code, captured.out, captured.err, seconds)

        return run

    executable = venv_tool("echo-scp")

    def run_script(*args: str) -> Outcome:
        started = time.monotonic()
        done = subprocess.run([executable, "echo", *args], capture_output=True, text=True, timeout=30)
        return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    return run_script


def _tls_listener(files: dict[str, Path], **extra: str) -> dict[str, Any]:
    return {"tls": {"cert_file": str(files["cert"]), "key_file": str(files["key"]), **extra}}


def _mutual_tls_listener(files: dict[str, Path]) -> dict[str, Any]:
    return _tls_listener(files, ca_file=str(files["ca"]), client_certificates="required")


@pytest.fixture
def failing_scp() -> Iterator[int]:
    """A pynetdicom SCP that answers every C-ECHO with 0x0110 (Processing failure); yields its port."""
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda event: 0x0110)]
    )
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


# --------------------------------------------------------------------------
# Success
# --------------------------------------------------------------------------


def test_echo_succeeds_with_one_line(start_service, run_echo):
    """A C-ECHO to the daemon exits 0 and prints one result line with its timing."""
    running = start_service()
    result = run_echo(f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err
    assert SUCCESS_LINE.match(result.out.strip()), result.out
    assert result.out.count("\n") == 1
    assert result.err == ""


def test_echoscu_style_address(start_service, run_echo):
    """echoscu's ``HOST PORT -aec AET`` form works, and -aec overrides the AET@ of the address."""
    running = start_service()
    assert run_echo("127.0.0.1", str(running.port()), "-aec", "ECHOSCP").code == 0
    assert run_echo("-aec", "ECHOSCP", f"WRONG@127.0.0.1:{running.port()}").code == 0


def test_repeat_sends_every_echo(start_service, run_echo):
    """--repeat 3 sends three C-ECHOs, which the daemon counts as three successes."""
    running = start_service()
    result = run_echo("--repeat", "3", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err
    assert result.out.startswith("3 C-ECHOs to ECHOSCP@127.0.0.1:")
    running.wait_idle()
    labels = {"listener": "dicom", "calling_ae": "other", "status": "success"}
    assert running.sample("echo_scp_echo_requests_total", **labels) == 3


def test_abort_ends_with_a_peer_abort(start_service, run_echo):
    """--abort ends the association with A-ABORT, which the daemon logs as aborted by the peer."""
    running = start_service()
    result = run_echo("--abort", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err
    running.wait_idle()
    ended = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert [(e["outcome"], e.get("abort_source")) for e in ended] == [("aborted", "peer")]


def test_quiet_prints_nothing(start_service, run_echo):
    """-q prints nothing, on success and on failure; the exit status carries the result."""
    running = start_service()
    ok = run_echo("-q", f"ECHOSCP@127.0.0.1:{running.port()}")
    refused = run_echo("-q", f"127.0.0.1:{free_port()}")
    assert (ok.code, ok.out, ok.err) == (0, "", "")
    assert (refused.code, refused.out, refused.err) == (2, "", "")


def test_verbose_describes_the_association(start_service, run_echo):
    """-v keeps the result line on stdout and describes the negotiation and release on stderr."""
    running = start_service(listeners=[{"transfer_syntaxes": [scu.EXPLICIT_VR_LITTLE_ENDIAN]}])
    result = run_echo("-v", "-xe", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err
    assert SUCCESS_LINE.match(result.out.strip())
    assert "I: Association accepted: Explicit VR Little Endian" in result.err
    assert "I: Association released" in result.err


# --------------------------------------------------------------------------
# Failures and their exit codes
# --------------------------------------------------------------------------


def test_wrong_called_ae_title_exits_3(start_service, run_echo):
    """A rejection exits 3 and says why in the A-ASSOCIATE-RJ words (1/1/7)."""
    running = start_service()
    result = run_echo(f"NOT-ME@127.0.0.1:{running.port()}")
    assert result.code == 3
    assert result.out == ""
    assert (
        "association rejected: permanent, service-user, called AE title not recognised (1/1/7)" in result.err
    )


def test_connection_refused_exits_2(run_echo):
    """Nothing listening exits 2 with "connection refused"."""
    result = run_echo(f"ECHOSCP@127.0.0.1:{free_port()}")
    assert result.code == 2
    assert "connection refused" in result.err


def test_silent_peer_times_out_with_5(run_echo):
    """A peer that accepts TCP but never answers exits 5 once the ACSE timeout has passed, not later."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        result = run_echo("-ta", "0.5", f"ECHOSCP@127.0.0.1:{port}")
    assert result.code == 5
    assert "ACSE timeout (0.5 s) while waiting for the A-ASSOCIATE response" in result.err
    assert 0.5 <= result.seconds < 5


def test_non_success_status_exits_4(failing_scp, run_echo):
    """A C-ECHO answered with a failure status exits 4 and names the status."""
    result = run_echo(f"ECHOSCP@127.0.0.1:{failing_scp}")
    assert result.code == 4
    assert "C-ECHO status 0x0110 (Failure)" in result.err


def test_no_accepted_context_exits_3(start_service, run_echo):
    """Proposing only implicit VR to a listener that accepts only explicit big endian exits 3."""
    running = start_service(listeners=[{"transfer_syntaxes": [scu.EXPLICIT_VR_BIG_ENDIAN]}])
    result = run_echo("-xi", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 3
    assert "no accepted presentation context" in result.err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "the following arguments are required"),
        (("ECHOSCP@127.0.0.1:0",), "invalid address"),
        (("127.0.0.1:104", "11112"), "the port is given twice"),
        (("--repeat", "0", "127.0.0.1"), "must be between 1 and 65535"),
        (("-ta", "-1", "127.0.0.1"), "must be a positive number"),
        (("--ca-file", "/nonexistent/ca.pem", "127.0.0.1"), "cannot load the TLS files"),
    ],
)
def test_usage_errors_exit_1(run_echo, args, words):
    """Bad arguments exit 1, not argparse's 2, which would read as "could not connect"."""
    result = run_echo(*args)
    assert result.code == 1
    assert words in result.err


def test_help_documents_the_exit_codes(run_echo):
    """--help exits 0 and its epilog lists every exit status."""
    result = run_echo("--help")
    assert result.code == 0
    epilog = result.out[result.out.index("exit status:") :]
    for code in range(6):
        assert re.search(rf"^  {code}  ", epilog, re.MULTILINE), code


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_tls_with_ca_file(start_service, tls_files, run_echo):
    """--tls --ca-file verifies the daemon's certificate and succeeds."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo("--tls", "--ca-file", str(tls_files["ca"]), f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err
    assert SUCCESS_LINE.match(result.out.strip())


def test_mutual_tls_with_client_certificate(start_service, tls_files, run_echo):
    """With client certificates required, --cert-file/--key-file signed by the daemon's CA succeed."""
    running = start_service(listeners=[_mutual_tls_listener(tls_files)])
    result = run_echo(
        "--ca-file", str(tls_files["ca"]),
        "--cert-file", str(tls_files["client_cert"]),
        "--key-file", str(tls_files["client_key"]),
        f"ECHOSCP@127.0.0.1:{running.port()}",
    )  # fmt: skip
    assert result.code == 0, result.err


def test_mutual_tls_without_client_certificate_exits_2(start_service, tls_files, run_echo):
    """Without a client certificate the daemon refuses the connection: exit 2, could not connect."""
    running = start_service(listeners=[_mutual_tls_listener(tls_files)])
    result = run_echo("--ca-file", str(tls_files["ca"]), f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 2
    assert "TLS" in result.err


def test_tls_untrusted_server_exits_2(start_service, tls_files, run_echo):
    """Without the daemon's CA the certificate does not verify: exit 2 and a hint to pass --ca-file."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo("--tls", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 2
    assert "TLS handshake failed" in result.err
    assert "certificate verify failed" in result.err
    assert "--ca-file" in result.err


def test_tls_insecure_skips_verification(start_service, tls_files, run_echo):
    """--insecure connects without trusting the CA; it must be asked for explicitly."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo("--insecure", f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 0, result.err


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"--ca-file": "missing"}, "cannot read CA file '{missing}': No such file or directory"),
        ({"--ca-file": "client_key"}, "CA file '{client_key}' holds no PEM certificate"),
        (
            {"--cert-file": "client_cert"},
            "certificate file '{client_cert}' holds no private key, and no key file was given",
        ),
        (
            {"--cert-file": "client_cert", "--key-file": "key"},
            "key file '{key}' does not match certificate file '{client_cert}'",
        ),
        ({"--cert-file": "client_cert", "--key-file": "missing"}, "cannot read key file '{missing}'"),
    ],
)
def test_unusable_tls_file_is_named(run_echo, tls_files, tmp_path, files, words):
    """A TLS file that cannot be used exits 1 with its path and what is wrong, not OpenSSL's "PEM lib"."""
    paths = {**{name: str(path) for name, path in tls_files.items()}, "missing": str(tmp_path / "none.pem")}
    args = [part for flag, name in files.items() for part in (flag, paths[name])]
    result = run_echo(*args, "127.0.0.1")
    assert result.code == 1
    assert f"echo-scp echo: cannot load the TLS files: {words.format(**paths)}" in result.err
    assert "PEM lib" not in result.err and "Errno" not in result.err


def test_wrong_ca_file_is_not_told_to_pass_a_ca_file(start_service, tls_files, run_echo):
    """With a --ca-file that did not issue the server's certificate, the hint names that file instead."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo("--ca-file", str(tls_files["stranger_cert"]), f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 2
    assert f"no CA in --ca-file {tls_files['stranger_cert']} issued it" in result.err
    assert "as --ca-file" not in result.err


def test_wrong_server_name_points_at_tls_server_name(start_service, tls_files, run_echo):
    """A certificate for another name suggests --tls-server-name, not --ca-file."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo(
        "--ca-file", str(tls_files["ca"]), "--tls-server-name", "other.example",
        f"ECHOSCP@127.0.0.1:{running.port()}",
    )  # fmt: skip
    assert result.code == 2
    assert "Hostname mismatch" in result.err and "--tls-server-name" in result.err
    assert "--ca-file" not in result.err


def test_plain_dicom_to_a_tls_port_suggests_tls(start_service, tls_files, run_echo):
    """Plain DICOM sent to a TLS listener says the port may expect TLS and suggests --tls."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    result = run_echo(f"ECHOSCP@127.0.0.1:{running.port()}")
    assert result.code == 3
    assert "while waiting for the A-ASSOCIATE response: the port may expect TLS (try --tls" in result.err


def test_default_timeouts_suit_a_probe(run_echo):
    """The ACSE, DIMSE and network timeouts default to 10 s, not echoscu's 30 s."""
    result = run_echo("--help")
    help_text = " ".join(result.out.split())
    for option in ("--acse-timeout", "--dimse-timeout", "--network-timeout"):
        described = help_text[help_text.index(f"{option} SECONDS") :]
        assert "(default: 10)" in described[: described.index(")") + 1], option


# --------------------------------------------------------------------------
# Start-up cost
# --------------------------------------------------------------------------


def test_echo_cli_imports_nothing_heavy():
    """Importing the echo command, as the console script does, loads none of the daemon's dependencies."""
    code = "import sys, echo_scp.cli, echo_scp.echo_cli; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    timed = {
        line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line
    }
    assert "echo_scp" in loaded
    for heavy in HEAVY_MODULES:
        assert heavy not in loaded, heavy
        assert heavy not in timed, heavy


def test_probe_run_imports_nothing_heavy(start_service):
    """A whole run of the installed console script, C-ECHO included, imports none of the heavy modules."""
    running = start_service()
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            venv_tool("echo-scp"),
            "echo",
            f"ECHOSCP@127.0.0.1:{running.port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    timed = {
        line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line
    }
    assert "echo_scp" in timed
    assert not timed & set(HEAVY_MODULES)


# --------------------------------------------------------------------------
# EchoServer and the echo_server fixture
# --------------------------------------------------------------------------


def test_echo_server_serves_and_frees_its_port():
    """EchoServer binds port 0, answers echo() with Success, and stop() gives the port back."""
    with EchoServer() as server:
        port = server.port
        assert port != 0
        assert server.address == f"ECHOSCP@127.0.0.1:{port}"
        assert scu.echo(server.address) == 0x0000
        assert server.http_port is None
    with socket.socket() as probe:
        # SO_REUSEADDR tolerates TIME_WAIT leftovers but not a listener still bound.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen(1)
    with pytest.raises(scu.ConnectFailed):
        scu.echo(server.address)


def test_echo_server_start_stop_without_with():
    """start()/stop() work outside a with block; a stopped server refuses to start again."""
    server = EchoServer(ae_title="PACS")
    with pytest.raises(RuntimeError):
        _ = server.port
    server.start()
    try:
        assert scu.echo(server.address) == 0x0000
        assert server.address.startswith("PACS@")
    finally:
        server.stop()
    with pytest.raises(RuntimeError):
        server.start()


def test_echo_server_policy_and_listener_options():
    """The AE title checks apply, and extra keywords reach the listener settings."""
    with EchoServer(allowed_calling_ae_titles=["MODALITY"], max_associations=3) as server:
        assert server.service.listeners[0].settings.max_associations == 3
        assert scu.echo(server.address, calling_aet="MODALITY") == 0x0000
        with pytest.raises(scu.AssociationRejected) as calling:
            scu.echo(server.address, calling_aet="STRANGER")
        assert (calling.value.result, calling.value.source, calling.value.reason) == (1, 1, 3)
        with pytest.raises(scu.AssociationRejected) as called:
            scu.echo(f"OTHER@127.0.0.1:{server.port}", calling_aet="MODALITY")
        assert called.value.reason == 7
    with EchoServer(require_called_ae_title=False) as lenient:
        assert scu.echo(f"ANY-SCP@127.0.0.1:{lenient.port}") == 0x0000


def test_echo_server_tls_and_http(tls_files):
    """tls= takes TlsSettings fields, and http=True serves the health endpoint on its own free port."""
    tls = {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}
    with EchoServer(tls=tls, http=True) as server:
        context = scu.client_ssl_context(ca_file=str(tls_files["ca"]))
        assert scu.echo(server.address, ssl_context=context) == 0x0000
        assert server.http_port
        assert http_get(server.http_port, "/livez")[0] == 200
        wait_for(lambda: http_get(server.http_port or 0, "/readyz")[0] == 200)
        assert server.registry.get_sample_value("echo_scp_ready") == 1


def test_echo_server_ignores_the_working_directory_config(tmp_path, monkeypatch):
    """A config/echo-scp.toml in the working directory (someone else's project) is not read."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "echo-scp.toml").write_text("this is = not [valid\n")
    monkeypatch.chdir(tmp_path)
    with EchoServer() as server:
        assert scu.echo(server.address) == 0x0000


def test_echo_server_fixture(echo_server, request):
    """The echo_server fixture, registered through the pytest11 entry point, yields a started server."""
    assert request.config.pluginmanager.get_plugin("echo_scp") is not None
    assert scu.echo(echo_server.address) == 0x0000


@pytest.mark.parametrize("echo_server", [{"ae_title": "PACS"}], indirect=True)
def test_echo_server_fixture_takes_keywords(echo_server):
    """Indirect parametrisation hands the fixture EchoServer keywords."""
    assert echo_server.address.startswith("PACS@")
    assert scu.echo(echo_server.address) == 0x0000


def test_testing_module_needs_neither_pytest_nor_pynetdicom():
    """echo_scp.testing imports without pytest, and loading it (as the plugin) pulls in no pynetdicom."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import echo_scp.testing as t\n"
        "assert not hasattr(t, 'echo_server')\n"
        "assert 'pynetdicom' not in sys.modules and 'pydantic' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
