"""``echo-scp echo``: send C-ECHO to a DICOM node and exit with what happened.

It runs as a Kubernetes exec probe every few seconds, so it imports only the
standard library and :mod:`echo_scp.scu`, never pynetdicom, pydicom, pydantic,
structlog or prometheus_client. The options follow pynetdicom's ``echoscu``
(``-aet``, ``-aec``, ``-ta``, ``-td``, ``-tn``, ``-pdu``, ``--repeat``,
``--abort``); the address is dicom-echo's ``[AET@]HOST[:PORT]``.

The exit status tells a probe why it failed without parsing any output; the
values are the ``exit_code`` of the :mod:`echo_scp.scu` exceptions.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from echo_scp import scu
from echo_scp.protocol import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STATUS_SUCCESS,
    TRANSFER_SYNTAX_NAMES,
    format_address,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["EXIT_OK", "EXIT_USAGE", "KEY_PASSWORD_ENV", "main"]

EXIT_OK = 0
EXIT_USAGE = 1
# Outside the daemon's ECHO_SCP_ prefix on purpose: the daemon rejects unknown
# ECHO_SCP_* variables, and a probe usually shares the daemon's environment.
KEY_PASSWORD_ENV = "ECHO_SCU_KEY_PASSWORD"
DEFAULT_PORT = 11112
DEFAULT_CALLED_AET = "ANY-SCP"

# What DCMTK's -xe/-xb/-xi propose (pynetdicom's echoscu proposes only the one
# syntax for -xe/-xb); without a flag, implicit first, as both do by default.
_PROPOSALS = {
    "default": scu.DEFAULT_TRANSFER_SYNTAXES,
    "prefer_little": (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN),
    "prefer_big": (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN),
    "implicit": (IMPLICIT_VR_LITTLE_ENDIAN,),
}

_EPILOG = f"""\
exit status:
  0  every C-ECHO returned Success (0x0000)
  1  usage error, or local trouble such as an unreadable TLS file
  2  could not connect: name not resolved, connection refused or timed out,
     TLS handshake failed (certificate not trusted, client certificate refused)
  3  association rejected or aborted, no accepted presentation context,
     or the peer broke the protocol
  4  a C-ECHO returned a status other than Success
  5  timed out waiting for the peer (ACSE, DIMSE or network timeout)

The key password may also come from ${KEY_PASSWORD_ENV}, which keeps it out of
the process list.
"""


class _Exit(Exception):
    """argparse wanted to end the process; main() returns the status instead."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(status)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that returns through main() and exits 1 on a usage error.

    argparse exits 2 on a usage error, which here means "could not connect".
    """

    # add_argument() builds a help formatter only to check the metavar, and a
    # formatter without a width imports shutil to ask the terminal for one:
    # 2 ms of every probe run. Text meant for a reader still gets the real width.
    building = True

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self.building:
            return argparse.RawDescriptionHelpFormatter(prog=self.prog, width=80)
        return super()._get_formatter()

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def _parser() -> _Parser:
    parser = _Parser(
        prog="echo-scp echo",
        usage="%(prog)s [options] [AET@]HOST[:PORT] [PORT]",
        description="Send C-ECHO (DICOM Verification) to a peer: one association carrying\n"
        "--repeat C-ECHO requests, ended by A-RELEASE (or A-ABORT with --abort).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "address",
        metavar="[AET@]HOST[:PORT]",
        help=f"the peer: called AE title (default {DEFAULT_CALLED_AET}), host name or IP address "
        f"(an IPv6 address with a port as [ADDR]:PORT), port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "port",
        metavar="PORT",
        nargs="?",
        type=_bounded_int(1, 65535),
        help="the port, as pynetdicom's echoscu takes it, when the address has none",
    )

    out = parser.add_argument_group("output").add_mutually_exclusive_group()
    out.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=0,
        help="print nothing; the exit status says it all",
    )
    out.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=2,
        help="also describe the association on stderr",
    )
    out.add_argument(
        "-d",
        "--debug",
        dest="verbosity",
        action="store_const",
        const=3,
        help="as -v, plus the options used and the underlying error of a failure",
    )
    parser.set_defaults(verbosity=1)

    net = parser.add_argument_group("network")
    net.add_argument(
        "-aet",
        "--calling-aet",
        metavar="AET",
        default="ECHOSCU",
        help="this client's AE title (default: %(default)s)",
    )
    net.add_argument(
        "-aec",
        "--called-aet",
        metavar="AET",
        help=f"the peer's AE title; overrides AET@ in the address (default: {DEFAULT_CALLED_AET})",
    )
    net.add_argument(
        "-ta",
        "--acse-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=scu.DEFAULT_TIMEOUT,
        help="wait this long for an association or release answer (default: %(default)g)",
    )
    net.add_argument(
        "-td",
        "--dimse-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=scu.DEFAULT_TIMEOUT,
        help="wait this long for each C-ECHO response (default: %(default)g)",
    )
    net.add_argument(
        "-tn",
        "--network-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=scu.DEFAULT_TIMEOUT,
        help="bound on connecting, the TLS handshake and each send (default: %(default)g)",
    )
    net.add_argument(
        "-pdu",
        "--max-pdu",
        metavar="BYTES",
        type=_bounded_int(0, 0xFFFFFFFF),
        default=16382,
        help="largest PDU this client receives, 0 for no limit (default: %(default)s)",
    )

    ts = parser.add_argument_group("transfer syntaxes").add_mutually_exclusive_group()
    ts.add_argument(
        "-xe",
        "--prefer-little",
        dest="proposal",
        action="store_const",
        const="prefer_little",
        help="propose the uncompressed syntaxes, explicit VR little endian first",
    )
    ts.add_argument(
        "-xb",
        "--prefer-big",
        dest="proposal",
        action="store_const",
        const="prefer_big",
        help="propose the uncompressed syntaxes, explicit VR big endian first",
    )
    ts.add_argument(
        "-xi",
        "--implicit",
        dest="proposal",
        action="store_const",
        const="implicit",
        help="propose implicit VR little endian only (default: all three, implicit first)",
    )
    parser.set_defaults(proposal="default")

    misc = parser.add_argument_group("association")
    misc.add_argument(
        "--repeat",
        metavar="N",
        type=_bounded_int(1, 0xFFFF),
        default=1,
        help="send N C-ECHO requests on the one association (default: %(default)s)",
    )
    misc.add_argument("--abort", action="store_true", help="end the association with A-ABORT, not A-RELEASE")

    tls = parser.add_argument_group("TLS (each of these options implies --tls)")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the server against the system CAs or --ca-file",
    )
    tls.add_argument("--ca-file", metavar="PEM", help="trust the CA certificates in this file")
    tls.add_argument("--cert-file", metavar="PEM", help="present this client certificate (mutual TLS)")
    tls.add_argument("--key-file", metavar="PEM", help="private key of --cert-file (default: in --cert-file)")
    tls.add_argument(
        "--key-password", metavar="TEXT", help=f"password of an encrypted key (better: ${KEY_PASSWORD_ENV})"
    )
    tls.add_argument(
        "--tls-min-version", choices=["1.2", "1.3"], help="lowest TLS version accepted (default: 1.2)"
    )
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="the name the server certificate must carry (default: HOST)"
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate or name (never the default)",
    )
    parser.building = False
    return parser


class _Reporter:
    """Writes the result line to stdout and everything else to stderr, by verbosity."""

    def __init__(self, verbosity: int) -> None:
        self.verbosity = verbosity

    def result(self, line: str) -> None:
        if self.verbosity >= 1:
            print(line, flush=True)

    def failure(self, line: str) -> None:
        if self.verbosity >= 1:
            print(line, file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        if self.verbosity >= 2:
            print(f"I: {line}", file=sys.stderr, flush=True)

    def debug(self, line: str) -> None:
        if self.verbosity >= 3:
            print(f"D: {line}", file=sys.stderr, flush=True)


def _syntax_name(uid: str) -> str:
    return TRANSFER_SYNTAX_NAMES.get(uid, uid)


def _target(args: argparse.Namespace) -> tuple[str, str, int]:
    """(called AE, host, port) from the address, -aec and the echoscu-style PORT."""
    # A default port of 0 tells an address without a port apart, as the parser
    # refuses an explicit port 0.
    called, host, port = scu.parse_address(
        args.address, default_port=0, default_called_aet=DEFAULT_CALLED_AET
    )
    if args.port is not None:
        if port:
            raise ValueError(f"the port is given twice: in {args.address!r} and as {args.port}")
        port = args.port
    if args.called_aet is not None:
        called = args.called_aet
    return called, host, port or DEFAULT_PORT


def _wants_tls(args: argparse.Namespace) -> bool:
    extras = (
        args.ca_file,
        args.cert_file,
        args.key_file,
        args.key_password,
        args.tls_min_version,
        args.tls_server_name,
    )
    return bool(args.tls or args.insecure or any(value is not None for value in extras))


def _echo(args: argparse.Namespace, report: _Reporter) -> int:
    try:
        called, host, port = _target(args)
    except ValueError as exc:
        report.failure(f"echo-scp echo: invalid address: {exc}")
        return EXIT_USAGE
    peer = f"{called}@{format_address(host, port)}"
    transfer_syntaxes = _PROPOSALS[args.proposal]
    tls = _wants_tls(args)
    report.debug(
        f"calling AE {args.calling_aet}, ACSE/DIMSE/network timeouts {args.acse_timeout:g}/"
        f"{args.dimse_timeout:g}/{args.network_timeout:g} s, max PDU {args.max_pdu}, proposing "
        + ", ".join(_syntax_name(uid) for uid in transfer_syntaxes)
    )

    ssl_context = None
    if tls:
        password = args.key_password if args.key_password is not None else os.environ.get(KEY_PASSWORD_ENV)
        if args.insecure:
            report.info("TLS server certificate and name are NOT verified (--insecure)")
        report.debug(
            f"TLS: CA file {args.ca_file or '(system CAs)'}, "
            f"client certificate {args.cert_file or '(none)'}, "
            f"minimum version {args.tls_min_version or '1.2'}"
        )
        try:
            ssl_context = scu.client_ssl_context(
                ca_file=args.ca_file,
                cert_file=args.cert_file,
                key_file=args.key_file,
                key_password=password,
                insecure=args.insecure,
                minimum_version=f"TLSv{args.tls_min_version or '1.2'}",
            )
        except ValueError as exc:
            report.failure(f"echo-scp echo: {exc}")
            return EXIT_USAGE
        except scu.TlsFileError as exc:
            hint = " (--key-password or $" + KEY_PASSWORD_ENV + ")" if "no key password" in str(exc) else ""
            report.failure(f"echo-scp echo: cannot load the TLS files: {exc}{hint}")
            return EXIT_USAGE
        except OSError as exc:  # ssl.SSLError is an OSError
            report.failure(f"echo-scp echo: cannot load the TLS files: {exc}")
            return EXIT_USAGE

    report.info(f"Requesting association with {peer} as {args.calling_aet}" + (" over TLS" if tls else ""))
    try:
        result = scu.echo_association(
            host,
            port,
            called_aet=called,
            calling_aet=args.calling_aet,
            repeat=args.repeat,
            abort=args.abort,
            acse_timeout=args.acse_timeout,
            dimse_timeout=args.dimse_timeout,
            network_timeout=args.network_timeout,
            max_pdu=args.max_pdu,
            transfer_syntaxes=transfer_syntaxes,
            ssl_context=ssl_context,
            server_hostname=args.tls_server_name,
        )
    except ValueError as exc:
        report.failure(f"echo-scp echo: {exc}")
        return EXIT_USAGE
    except scu.EchoError as exc:
        report.failure(f"C-ECHO to {peer} failed: {_explain(exc, args)}")
        cause = exc.__cause__
        if cause is not None:
            report.debug(f"caused by {type(cause).__name__}: {cause}")
        return exc.exit_code

    report.info(
        f"Association accepted: {_syntax_name(result.transfer_syntax)}, peer max PDU "
        f"{result.peer_max_pdu or 'unlimited'}"
    )
    for message_id, status in enumerate(result.statuses, start=1):
        report.info(f"C-ECHO {message_id}: {scu.status_category(status)} (0x{status:04X})")
    report.info("Association aborted (--abort)" if args.abort else "Association released")

    count = len(result.statuses)
    what = "C-ECHO" if count == 1 else f"{count} C-ECHOs"
    elapsed_ms = result.elapsed * 1000
    failed = next((status for status in result.statuses if status != STATUS_SUCCESS), None)
    if failed is not None:
        error = scu.EchoFailedStatus(failed)
        report.failure(f"{what} to {peer} failed: {error}")
        return error.exit_code
    report.result(f"{what} to {peer}: Success (0x0000) in {elapsed_ms:.1f} ms")
    return EXIT_OK


# OpenSSL verify codes (X509_V_ERR_*) that mean "no trusted CA for this chain".
_UNTRUSTED_CHAIN = {2, 18, 19, 20, 21}
_HOSTNAME_MISMATCH = 62


def _explain(exc: scu.EchoError, args: argparse.Namespace) -> str:
    """The error in the words of pynetdicom's troubleshooting guide, with a hint where one helps."""
    if isinstance(exc, scu.NoAcceptedContext):
        return f"no accepted presentation context: Verification {exc.result_text} (result {exc.result})"
    if isinstance(exc, scu.ProtocolError) and exc.tls_suspected:
        return f"{exc} (try --tls, with --ca-file for a private CA)"
    cause = exc.__cause__
    # Only a TLS handshake raises this, and then ssl is already imported.
    ssl_module = sys.modules.get("ssl")
    if ssl_module is not None and isinstance(cause, ssl_module.SSLCertVerificationError):
        if cause.verify_code == _HOSTNAME_MISMATCH:
            return f"{exc} (pass a name the server's certificate carries as --tls-server-name)"
        if cause.verify_code in _UNTRUSTED_CHAIN:
            if args.ca_file is None:
                return f"{exc} (certificate verify failed: pass the server's CA as --ca-file)"
            return f"{exc} (certificate verify failed: no CA in --ca-file {args.ca_file} issued it)"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``echo-scp echo`` with ``argv`` (default: the process arguments); return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(arguments)
    except _Exit as done:
        return done.status
    return _echo(args, _Reporter(args.verbosity))


if __name__ == "__main__":
    sys.exit(main())
