"""Configuration: the one model that defines every option, and how it is loaded.

Every option exists exactly once, as a field below. The config file, the
environment and the command line are views of these fields:

* config file (TOML): the field names as keys, ``[[listeners]]`` tables;
  values are typed (``port = "104"`` is an error, not a port), and relative
  paths resolve against the file's own folder;
* environment: ``ECHO_SCP_<FIELD>`` with ``__`` between nesting levels
  (``ECHO_SCP_HTTP__PORT``), a JSON list for ``ECHO_SCP_LISTENERS``, and, for
  the common single-listener case, any listener field without the
  ``LISTENERS`` part (``ECHO_SCP_AE_TITLE``, ``ECHO_SCP_PORT``,
  ``ECHO_SCP_TLS__CERT_FILE``), which applies to the first listener; plain
  values are strings, converted by the field's type (JSON values keep their
  JSON types);
* command line: ``echo-scp serve`` flags, which also apply to the first
  listener (cli.py builds their layer; it also picks the file).

Each source becomes a :class:`Layer`: values at locations, each naming the
source that set it. The layers are merged in order (file, environment, flags;
the last one to set a location wins, and a list is replaced, not merged), and
the merged mapping is validated once, in pydantic's strict mode. A problem
line names the location and the sources behind it:
``listeners[0].port: Input should be a valid integer (from /etc/echo-scp/echo-scp.toml)``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import time
import tomllib
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from echo_scp import certificates
from echo_scp import tls as tls_contexts
from echo_scp.protocol import check_ae_title, format_address
from echo_scp.transfer_syntax import DEFAULT_TRANSFER_SYNTAXES, resolve_transfer_syntax

ENV_PREFIX = "ECHO_SCP_"
# Names the config file (cli.py reads it); not a setting itself.
CONFIG_ENV_VAR = "ECHO_SCP_CONFIG"

# A location in the configuration: ("listeners", 0, "tls", "cert_file").
Loc = tuple[int | str, ...]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# PS3.5's AE VR rules; leading and trailing spaces are not significant.
AETitle = Annotated[str, AfterValidator(check_ae_title)]


def _check_ip_literal(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IPv4 or IPv6 address literal, got {value!r}") from None
    return value


IPLiteral = Annotated[str, AfterValidator(_check_ip_literal)]

_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def _check_listener_name(value: str) -> str:
    # Python's re rather than Field(pattern=...): pydantic-core compiles a
    # pattern into a Rust regex per validator that holds it, about 0.3 MiB each.
    if not _LISTENER_NAME.fullmatch(value):
        rule = "must be 1 to 32 letters, digits, '_', '.' or '-', starting with a letter or digit"
        raise ValueError(f"{rule}, got {value!r}")
    return value


ListenerName = Annotated[str, AfterValidator(_check_listener_name)]


def _transfer_syntax_uids(value: list[str]) -> list[str]:
    """Names or UIDs to UIDs, each once."""
    uids = [resolve_transfer_syntax(item) for item in value]
    if len(set(uids)) != len(uids):
        raise ValueError("transfer syntaxes must not repeat")
    return uids


TransferSyntaxes = Annotated[list[str], AfterValidator(_transfer_syntax_uids)]


def _check_network(value: str) -> str:
    """A network in CIDR notation (or one address), written the way ``ipaddress`` prints it."""
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"must be a network in CIDR notation (10.1.2.0/24, fd00::/64) or an IP address, got {value!r}"
        ) from None
    # 10.1.2.5/24 is a typo for one of two things: name both.
    address = value.partition("/")[0].strip()
    raise ValueError(
        f"{value!r} has host bits set: write {str(loose)!r} for the network or {address!r} for the one host"
    )


Network = Annotated[str, AfterValidator(_check_network)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# The error type of _conflicts: several problems, each at its own location.
_CONFLICT = "settings_conflict"


def _conflicts(problems: Sequence[tuple[Loc, str, Sequence[Loc]]]) -> PydanticCustomError:
    """One validation error carrying problems that each name their own location.

    A model validator can raise one error, at its model's location; this one
    carries, for each problem, the location it is about (under the model's),
    its message and the other locations involved, so that every problem gets
    its own line naming the sources behind all of them.
    """
    return PydanticCustomError(
        _CONFLICT,
        "{summary}",
        {
            "summary": "; ".join(message for _loc, message, _related in problems),
            "problems": [(loc, message, tuple(related)) for loc, message, related in problems],
        },
    )


class _CertificateFiles(_Strict):
    """TLS settings whose files the daemon watches: their identities, their certificates' validity, a reload.

    Validation records the files as it loaded them (``files``) and the
    validity period of each certificate it found, by role (``ROLES``: role ->
    field); :meth:`reloaded` validates the same settings again, reading the
    files anew, when the daemon sees them replaced on disk.
    """

    # Certificate role (the label of its metrics) -> field, and what an invalid certificate there breaks.
    ROLES: ClassVar[Mapping[str, str]] = {}
    CONSEQUENCES: ClassVar[Mapping[str, str]] = {}

    _files: certificates.FileState | None = PrivateAttr(None)
    _validity: dict[str, tuple[certificates.Validity, ...]] = PrivateAttr(default_factory=dict)

    @property
    def files(self) -> certificates.FileState:
        """The TLS files as they were when these settings loaded them, to notice a replacement."""
        return _loaded(self._files)

    def not_after(self) -> dict[str, float]:
        """Per certificate role, the Unix time when the first of its certificates expires."""
        return {role: min(v.not_after for v in found) for role, found in self._validity.items()}

    def validity_problems(self, now: float | None = None) -> list[tuple[str, str]]:
        """(field, problem) for each certificate outside its validity period at ``now`` (default: now)."""
        now = time.time() if now is None else now
        found: list[tuple[str, str]] = []
        for role, field in self.ROLES.items():
            validities = self._validity.get(role, ())
            for label, validity in zip(certificates.labels(len(validities)), validities, strict=True):
                problem = certificates.validity_problem(validity, now, label)
                if problem is not None:
                    found.append((field, problem))
        return found

    def validity_notes(self, now: float | None = None) -> list[tuple[Loc, str]]:
        """The warnings about certificates outside their validity period, at their fields."""
        problems = self.validity_problems(now)
        return [((field,), f"{problem}; {self.CONSEQUENCES[field]}") for field, problem in problems]

    def warning_lines(self, at: Loc = ()) -> list[str]:
        """The warnings as lines, at ``at`` (these settings' location), with no source named."""
        return [_line((*at, *loc), message, [], None) for loc, message in self.validity_notes()]

    def reloaded(self, at: Loc = ()) -> Self:
        """These settings validated again, reading the files anew (they were replaced on disk).

        Raises ConfigError with one line per problem, at ``at`` (the location
        of these settings, ``("listeners", 0, "tls")``).
        """
        try:
            values = {name: getattr(self, name) for name in type(self).model_fields}
            return type(self).model_validate(values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix=at)) from None

    def _capture(self, *paths: Path | None) -> tuple[certificates.FileState, dict[Path, bytes | None]]:
        # Before anything loads the files: see FileState.capture.
        return certificates.FileState.capture([path for path in paths if path is not None])

    def _record(self, files: certificates.FileState, contents: Mapping[Path, bytes | None]) -> None:
        """Keep the files' state and their certificates' validity, once the files loaded."""
        self._files = files
        for role, field in self.ROLES.items():
            path = getattr(self, field)
            try:
                found = certificates.validities(contents.get(path) or b"") if path is not None else ()
            except ValueError:
                found = ()  # OpenSSL took it; dates this reader cannot find are not exported
            if found:
                self._validity[role] = found


class TlsSettings(_CertificateFiles):
    """TLS for one listener (DICOM PS3.15 secure transport, BCP 195 profile).

    Validation loads the files into the listener's server context and the
    readiness self-check's client context, which the listener and the prober
    then use (``server_context``, ``self_check_context``): the files are read
    once per load of the settings, and a reload, which builds new settings,
    reads them anew, as does :meth:`reloaded` when the daemon sees the files
    replaced on disk (that is how a rotated certificate takes effect). It also
    records the certificates' validity periods (``not_after``,
    ``validity_problems``) and the files' identities (``files``).

    A certificate outside its validity period is not an error (a certificate
    valid from tomorrow may be deployed today) but a warning
    (``Settings.warnings``); a self-check client certificate that the listener
    refuses for any other reason is an error, since /readyz could never pass.
    """

    cert_file: FilePath = Field(description="PEM certificate chain presented to peers.")
    key_file: FilePath = Field(description="PEM private key of cert_file.")
    key_password: SecretStr | None = Field(None, description="Password of an encrypted key.")
    ca_file: FilePath | None = Field(
        None, description="PEM CA bundle that client certificates must chain to."
    )
    client_certificates: Literal["none", "optional", "required"] = Field(
        "none", description="Whether peers must present a certificate (mutual TLS)."
    )
    min_version: Literal["1.2", "1.3"] = Field(
        "1.2", description="Lowest TLS version accepted; BCP 195 forbids anything below 1.2."
    )
    handshake_timeout: Seconds = Field(10.0, description="Seconds a peer gets to complete the TLS handshake.")
    self_check_cert_file: FilePath | None = Field(
        None,
        description="Client certificate for the readiness self-check when client "
        "certificates are required (default: cert_file).",
    )
    self_check_key_file: FilePath | None = Field(
        None, description="Key of self_check_cert_file (default: key_file)."
    )

    ROLES: ClassVar[Mapping[str, str]] = {
        "server": "cert_file",
        "ca": "ca_file",
        "self_check": "self_check_cert_file",
    }
    CONSEQUENCES: ClassVar[Mapping[str, str]] = {
        "cert_file": "TLS clients refuse it and /readyz fails",
        "ca_file": "client certificates that chain to it are refused",
        "self_check_cert_file": "the listener refuses it and /readyz fails",
    }

    _server_context: tls_contexts.DeferredHandshakeContext | None = PrivateAttr(None)
    _self_check_context: ssl.SSLContext | None = PrivateAttr(None)

    @property
    def server_context(self) -> tls_contexts.DeferredHandshakeContext:
        """The listener's server-side context, loaded when these settings were validated."""
        return _loaded(self._server_context)

    @property
    def self_check_context(self) -> ssl.SSLContext:
        """The client context of the listener's readiness self-check, loaded with the settings."""
        return _loaded(self._self_check_context)

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # TOML reads an unquoted `min_version = 1.3` as a float; reading it as
        # "1.3" beats rejecting it with "Input should be '1.2' or '1.3'".
        return str(value) if isinstance(value, float) else value

    @model_validator(mode="after")
    def _load(self) -> TlsSettings:
        if self.client_certificates != "none" and self.ca_file is None:
            raise ValueError(f"ca_file is required when client_certificates is {self.client_certificates!r}")
        if (self.self_check_cert_file is None) != (self.self_check_key_file is None):
            raise ValueError("self_check_cert_file and self_check_key_file go together")
        if self.key_password is None:
            for field in ("key_file", "self_check_key_file"):
                path = getattr(self, field)
                # Without a password OpenSSL would ask for one on the terminal,
                # blocking check-config and the daemon's start.
                if path is not None and _is_encrypted_pem(path):
                    raise ValueError(f"{field} is encrypted but key_password is not set")
        files, contents = self._capture(
            self.cert_file, self.key_file, self.ca_file, self.self_check_cert_file, self.self_check_key_file
        )
        try:
            self._server_context = tls_contexts.server_context(self)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(_tls_load_problem(exc, self.cert_file, self.key_file, self.ca_file)) from None
        try:
            self_check = tls_contexts.self_check_context(self)
        except tls_contexts.ClientCertificateRefused as exc:
            raise self._refused(exc) from None
        except (ssl.SSLError, OSError) as exc:
            # The server's files loaded just above, so only the self-check's own can fail.
            prefix = "self_check_" if self.self_check_cert_file is not None else ""
            cert = self.self_check_cert_file or self.cert_file
            raise ValueError(
                _tls_load_problem(exc, cert, self.self_check_key_file or self.key_file, None, prefix)
            ) from None
        self._self_check_context = self_check
        self._record(files, contents)
        return self

    def _refused(self, exc: tls_contexts.ClientCertificateRefused) -> PydanticCustomError:
        """The error for a self-check client certificate that the listener refuses."""
        # OpenSSL's words for a wrong purpose vary with its version ("unsupported",
        # "unsuitable"); what to fix does not.
        reason = (
            "its extended key usage does not include clientAuth"
            if exc.verify_code == tls_contexts.INVALID_PURPOSE
            else exc.verify_message
        )
        if self.self_check_cert_file is None:
            # The trap: the default quietly presents the server certificate.
            message = (
                "not set, so the readiness self-check presents cert_file as its client certificate, "
                f"and this listener refuses it: {reason}; set self_check_cert_file and "
                "self_check_key_file to a client certificate that ca_file trusts"
            )
            related: list[Loc] = [("cert_file",), ("ca_file",), ("client_certificates",)]
        else:
            message = (
                f"this listener refuses it as the readiness self-check's client certificate: {reason}; "
                "it must chain to ca_file and allow clientAuth"
            )
            related = [("ca_file",)]
        return _conflicts([(("self_check_cert_file",), message, related)])


_Loaded = TypeVar("_Loaded")


def _loaded(value: _Loaded | None) -> _Loaded:
    if value is None:
        raise RuntimeError("these TLS settings were built without validation, so nothing was loaded")
    return value


def _is_encrypted_pem(path: Path) -> bool:
    """Whether a PEM key file is password-protected (PKCS#8 or OpenSSL's legacy form)."""
    try:
        text = path.read_bytes()
    except OSError:
        return False  # reported when the file is loaded
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in text or b"Proc-Type: 4,ENCRYPTED" in text


def _holds_certificate(path: Path) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError):
        return False
    return True


def _tls_load_problem(exc: OSError, cert: Path, key: Path | None, ca: Path | None, prefix: str = "") -> str:
    """Name the TLS file that did not load; OpenSSL's own "PEM lib" rarely does."""
    if not isinstance(exc, ssl.SSLError):
        return f"cannot read the TLS files: {exc}"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{prefix}key_file does not match {prefix}cert_file"
    for field, path in ((f"{prefix}cert_file", cert), ("ca_file", ca)):
        if path is not None and not _holds_certificate(path):
            return f"{field} holds no PEM certificate"
    if key is not None and _is_encrypted_pem(key):
        return f"key_password does not decrypt {prefix}key_file"
    return f"{prefix}key_file holds no PEM private key"


class PeerSettings(_Strict):
    """A known calling AE title: the networks it may connect from and its own association limit.

    Hospital DICOM nodes bind each known AE title to where it may connect from
    (Orthanc's DicomCheckModalityHost, dcm4chee's dcmValidateCallingAEHostname)
    because the title alone is a string any peer can claim.
    """

    ae_title: AETitle = Field(description="The peer's calling AE title.")
    networks: list[Network] = Field(
        min_length=1,
        description="Networks the peer may connect from, in CIDR notation (IPv4 or IPv6); an address "
        "alone means just that host. 0.0.0.0/0 and ::/0 mean anywhere. Others using the title get 1/1/3.",
    )
    max_associations: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Concurrent associations of this peer, at most the listener's max_associations; "
        "the next gets 2/3/2. Unset: only the listener's limit applies.",
    )


class ListenerSettings(_Strict):
    """One DICOM listener: an address, an AE title and its association policy."""

    name: ListenerName = Field("dicom", description="Label used in metrics and logs.")
    host: IPLiteral = Field("0.0.0.0", description="Bind address (IPv4 or IPv6 literal).")
    port: Port = Field(11112, description="TCP port; 0 picks a free one.")
    ae_title: AETitle = Field("ECHOSCP", description="This listener's AE title.")
    transfer_syntaxes: TransferSyntaxes = Field(
        default_factory=lambda: list(DEFAULT_TRANSFER_SYNTAXES),
        min_length=1,
        description="Accepted transfer syntaxes, by name or UID, in order of preference.",
    )
    require_called_ae_title: bool = Field(
        True, description="Reject (1/1/7) associations whose called AE title is not ae_title."
    )
    allowed_calling_ae_titles: list[AETitle] = Field(
        default_factory=list,
        description="Calling AE titles accepted from any network (the short form of peers). With "
        "both this and peers empty any title is accepted; otherwise a title must be in one of the "
        "two (and a peer's from its networks), others get 1/1/3.",
    )
    peers: list[PeerSettings] = Field(
        default_factory=list,
        description="Known peers: a calling AE title, the networks it may connect from and an "
        "optional association limit of its own. A title is listed here or in "
        "allowed_calling_ae_titles, not in both.",
    )
    max_associations: int = Field(
        64, ge=1, le=100_000, description="Concurrent associations; the next gets 2/3/2."
    )
    acse_timeout: Seconds = Field(30.0, description="Seconds to wait for ACSE messages.")
    dimse_timeout: Seconds = Field(30.0, description="Seconds to wait for DIMSE messages.")
    network_timeout: Seconds = Field(
        30.0, description="Seconds an association may stay idle before it is aborted."
    )
    max_pdu_size: int = Field(16382, ge=0, le=2**32 - 1, description="Largest PDU we receive; 0 = unlimited.")
    listen_backlog: int = Field(128, ge=1, le=65535, description="TCP accept backlog.")
    request_timeout: Seconds = Field(
        10.0,
        description="Seconds a new connection has to send its A-ASSOCIATE-RQ (after any TLS "
        "handshake) before it is closed; acse_timeout applies instead if shorter.",
    )
    max_pending_connections: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Connections allowed to wait for their A-ASSOCIATE-RQ at once; beyond this "
        "the one waiting longest is closed, so a flood of silent connections cannot "
        "crowd out real peers.",
    )
    engine: Literal["event", "pynetdicom"] = Field(
        "event",
        description="Association engine: event (blocking waits, see engine.py) or pynetdicom "
        "(its stock polling threads, for comparison).",
    )
    tls: TlsSettings | None = Field(None, description="TLS; absent means plain TCP.")

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu_floor(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError("max_pdu_size must be 0 (unlimited) or at least 1024")
        return value

    @model_validator(mode="after")
    def _peers_consistent(self) -> ListenerSettings:
        problems: list[tuple[Loc, str, list[Loc]]] = []
        first_seen: dict[str, int] = {}
        anywhere = set(self.allowed_calling_ae_titles)
        for index, peer in enumerate(self.peers):
            where: Loc = ("peers", index)
            if peer.ae_title in first_seen:
                first = first_seen[peer.ae_title]
                problems.append(
                    (
                        (*where, "ae_title"),
                        f"{peer.ae_title!r} is already used by peers[{first}]",
                        [("peers", first, "ae_title")],
                    )
                )
            else:
                first_seen[peer.ae_title] = index
            if peer.ae_title in anywhere:
                problems.append(
                    (
                        (*where, "ae_title"),
                        f"{peer.ae_title!r} is also in allowed_calling_ae_titles (any network); "
                        "list it in one place",
                        [("allowed_calling_ae_titles",)],
                    )
                )
            limit = peer.max_associations
            if limit is not None and limit > self.max_associations:
                problems.append(
                    (
                        (*where, "max_associations"),
                        f"{limit} is above the listener's max_associations ({self.max_associations})",
                        [("max_associations",)],
                    )
                )
        if problems:
            raise _conflicts(problems)
        return self


# The client_auth_type values of the Prometheus exporter-toolkit's web
# configuration that Python's ssl module can enforce, and why the other two
# cannot be: a requested certificate is always verified.
CLIENT_AUTH_TYPES = ("NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
# bcrypt's modular crypt format ($2a$, $2b$ or $2y$, cost 04-31, 22 + 31
# characters of salt and hash), as htpasswd -B and the exporter-toolkit write it.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _check_bcrypt_hash(value: SecretStr) -> SecretStr:
    if not _BCRYPT_HASH.fullmatch(value.get_secret_value().strip()):
        raise ValueError("must be a bcrypt hash ($2b$12$ and 53 characters, as htpasswd -nBC 12 USER prints)")
    return SecretStr(value.get_secret_value().strip())


BcryptHash = Annotated[SecretStr, AfterValidator(_check_bcrypt_hash)]


def _check_user_name(value: str) -> str:
    if not value or ":" in value or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"user name {value!r} must be non-empty, without ':' or control characters")
    return value


UserName = Annotated[str, AfterValidator(_check_user_name)]


def read_users_file(path: Path) -> dict[str, str]:
    """``user:bcrypt-hash`` lines (htpasswd -B's format, ``#`` comments); ValueError names a bad line."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _BCRYPT_HASH.fullmatch(hashed.strip()):
            raise ValueError(f"line {number}: expected USER:BCRYPT-HASH (htpasswd -nBC 12 USER)")
        try:
            _check_user_name(user)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if user in users:
            raise ValueError(f"line {number}: user {user!r} is listed twice")
        users[user] = hashed.strip()
    return users


class HttpTlsSettings(_CertificateFiles):
    """TLS for the HTTP endpoint, as the Prometheus exporter-toolkit's ``tls_server_config``.

    Validation loads the files into the endpoint's server context
    (``server_context``), which the HTTP server then uses. HTTP settings
    change only with a restart, but files replaced on disk (a renewed
    certificate) are loaded again without one, as a listener's are
    (:meth:`reloaded`): the endpoint then hands new connections the new context.
    """

    ROLES: ClassVar[Mapping[str, str]] = {"server": "cert_file", "ca": "client_ca_file"}
    CONSEQUENCES: ClassVar[Mapping[str, str]] = {
        "cert_file": "HTTPS clients (Prometheus, kubelet probes) refuse it",
        "client_ca_file": "client certificates that chain to it are refused",
    }

    cert_file: FilePath = Field(description="PEM certificate chain the endpoint presents.")
    key_file: FilePath = Field(description="PEM private key of cert_file (unencrypted).")
    client_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle that client certificates must chain to."
    )
    client_auth_type: Literal[
        "NoClientCert",
        "RequestClientCert",
        "RequireAnyClientCert",
        "VerifyClientCertIfGiven",
        "RequireAndVerifyClientCert",
    ] = Field(
        "NoClientCert",
        description="NoClientCert; VerifyClientCertIfGiven (protected paths then need a verified "
        "certificate, health paths do not); RequireAndVerifyClientCert (every connection needs one).",
    )
    min_version: Literal["TLS12", "TLS13"] = Field("TLS12", description="Lowest TLS version accepted.")
    handshake_timeout: Seconds = Field(
        10.0, description="Seconds a client gets to complete the TLS handshake."
    )

    _server_context: ssl.SSLContext | None = PrivateAttr(None)

    @property
    def server_context(self) -> ssl.SSLContext:
        """The endpoint's server-side context, loaded when these settings were validated."""
        return _loaded(self._server_context)

    @model_validator(mode="after")
    def _load(self) -> HttpTlsSettings:
        if self.client_auth_type in _UNVERIFIED_CLIENT_AUTH:
            raise ValueError(
                f"client_auth_type {self.client_auth_type!r} is not supported (Python's ssl module "
                "verifies every certificate it asks for); use VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert with client_ca_file"
            )
        verifies = self.client_auth_type != "NoClientCert"
        if verifies and self.client_ca_file is None:
            raise ValueError(f"client_ca_file is required when client_auth_type is {self.client_auth_type!r}")
        if not verifies and self.client_ca_file is not None:
            # As the exporter-toolkit: a CA without a policy is a half-done configuration.
            raise ValueError("client_ca_file is set but client_auth_type is 'NoClientCert'")
        if _is_encrypted_pem(self.key_file):
            raise ValueError("key_file is encrypted; the HTTP endpoint needs an unencrypted key")
        files, contents = self._capture(self.cert_file, self.key_file, self.client_ca_file)
        try:
            self._server_context = tls_contexts.http_server_context(self)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(_tls_load_problem(exc, self.cert_file, self.key_file, None)) from None
        self._record(files, contents)
        return self


class HttpSettings(_Strict):
    """The health and metrics HTTP endpoint."""

    enabled: bool = Field(True, description="Serve /livez, /readyz and /metrics.")
    host: IPLiteral = Field("0.0.0.0", description="Bind address of the HTTP endpoint.")
    port: Port = Field(8080, description="HTTP port; 0 picks a free one.")
    enable_reload: bool = Field(
        False,
        description="Let POST /-/reload re-read the configuration (as Prometheus' "
        "--web.enable-lifecycle); SIGHUP always does.",
    )
    basic_auth_users: dict[UserName, BcryptHash] = Field(
        default_factory=dict,
        description="User names and their bcrypt password hashes; when any are configured, every "
        "path but the health paths needs HTTP basic authentication.",
    )
    basic_auth_users_file: FilePath | None = Field(
        None,
        description="A file of USER:BCRYPT-HASH lines (htpasswd -B's format), read at start, "
        "adding to basic_auth_users: the form to mount from a Secret.",
    )
    protect_health_paths: bool = Field(
        False,
        description="Require authentication on /livez, /readyz and their aliases too (off by default "
        "so that Kubernetes probes need no credentials).",
    )
    tls: HttpTlsSettings | None = Field(None, description="TLS; absent means plain HTTP.")
    request_timeout: Seconds = Field(
        10.0,
        description="Seconds a connection may take to send a request (line, headers and body) and may "
        "stay idle between requests; then it is closed.",
    )
    max_connections: int = Field(
        64,
        ge=1,
        le=10000,
        description="HTTP connections served at once; one more is answered 503 (or, with TLS, closed) at "
        "once and counted, so that clients holding connections cannot use up threads and memory.",
    )

    @model_validator(mode="after")
    def _users_file_loads(self) -> HttpSettings:
        path = self.basic_auth_users_file
        if path is not None:
            try:
                users = read_users_file(path)
            except ValueError as exc:
                raise _conflicts([(("basic_auth_users_file",), str(exc), [])]) from None
            both = sorted(set(users) & set(self.basic_auth_users))
            if both:
                message = (
                    f"{', '.join(map(repr, both))} also in basic_auth_users; list each user in one place"
                )
                raise _conflicts([(("basic_auth_users_file",), message, [("basic_auth_users",)])])
        return self

    def users(self) -> dict[str, str]:
        """Every user and bcrypt hash, from basic_auth_users and (read now) basic_auth_users_file."""
        users = {name: hashed.get_secret_value() for name, hashed in self.basic_auth_users.items()}
        if self.basic_auth_users_file is not None:
            users.update(read_users_file(self.basic_auth_users_file))
        return users


class LogSettings(_Strict):
    """Log output."""

    level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Lowest level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a TTY, JSON lines otherwise."
    )
    queue_size: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Log lines held for the writer thread; when the consumer of stdout stalls, "
        "further records are dropped and counted instead of blocking the DICOM path.",
    )

    @field_validator("level", mode="before")
    @classmethod
    def _normalise_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.lower()
            return "warning" if value == "warn" else value
        return value


class ReadinessSettings(_Strict):
    """The loopback C-ECHO self-check behind /readyz."""

    interval: Seconds = Field(5.0, description="Seconds between self-checks of each listener.")
    timeout: Seconds = Field(3.0, description="Seconds one self-check may take.")
    max_age: Seconds = Field(
        15.0,
        description="A listener is unready when its last success is older than this; at least "
        "interval + timeout.",
    )

    @model_validator(mode="after")
    def _fresh_enough(self) -> ReadinessSettings:
        # A check that starts `interval` after the last success and takes
        # `timeout` lands its success that late: a shorter max_age turns a
        # healthy listener unready between two checks.
        if self.max_age < self.interval + self.timeout:
            raise _conflicts(
                [
                    (
                        ("max_age",),
                        f"must be at least interval + timeout ({self.interval:g} s + {self.timeout:g} s = "
                        f"{self.interval + self.timeout:g} s), "
                        f"or /readyz fails between two successful self-checks; got {self.max_age:g} s",
                        [("interval",), ("timeout",)],
                    )
                ]
            )
        return self


class LivenessSettings(_Strict):
    """When /livez declares the process stuck (so that the orchestrator restarts it)."""

    stall_timeout: Seconds = Field(
        30.0,
        description="Seconds a listener's accept loop may leave a heartbeat unanswered, or its "
        "readiness self-check go unanswered (timed out, not refused), before /livez answers 503.",
    )


class ProbeTlsSettings(_Strict):
    """TLS for a probe module: how the peer is verified and which certificate is presented."""

    ca_file: FilePath | None = Field(
        None, description="PEM CA bundle the peer's certificate must chain to (default: the system CAs)."
    )
    cert_file: FilePath | None = Field(None, description="PEM client certificate, for mutual TLS.")
    key_file: FilePath | None = Field(None, description="PEM key of cert_file (default: inside cert_file).")
    key_password: SecretStr | None = Field(None, description="Password of an encrypted key_file.")
    server_name: str | None = Field(
        None, description="Name the peer's certificate must carry (default: the target's host)."
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Lowest TLS version accepted.")
    verify: bool = Field(True, description="Verify the peer's certificate and name; false only for tests.")

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, float) else value

    @model_validator(mode="after")
    def _loadable(self) -> ProbeTlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        from echo_scp.scu import TlsFileError

        try:
            self.client_context()
        except TlsFileError as exc:
            raise ValueError(str(exc)) from None
        return self

    def client_context(self) -> ssl.SSLContext:
        """A fresh client context; raises scu.TlsFileError naming a file that cannot be used."""
        from echo_scp.scu import client_ssl_context

        return client_ssl_context(
            ca_file=str(self.ca_file) if self.ca_file else None,
            cert_file=str(self.cert_file) if self.cert_file else None,
            key_file=str(self.key_file) if self.key_file else None,
            key_password=self.key_password.get_secret_value() if self.key_password else None,
            insecure=not self.verify,
            minimum_version=f"TLSv{self.min_version}",
        )


class ProbeModuleSettings(_Strict):
    """One way of probing a DICOM node with /probe?module=NAME."""

    calling_ae_title: AETitle = Field("ECHO_SCP_PROBE", description="AE title the probe calls from.")
    called_ae_title: AETitle = Field(
        "ANY-SCP", description="Called AE title when the target has none (AET@HOST)."
    )
    port: int = Field(11112, ge=1, le=65535, description="Port when the target has none (HOST:PORT).")
    timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds the whole probe may take; Prometheus' scrape timeout lowers it.",
    )
    transfer_syntaxes: TransferSyntaxes = Field(
        default_factory=lambda: ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "ExplicitVRBigEndian"],
        min_length=1,
        max_length=128,
        description="Transfer syntaxes proposed, by name or UID, in order of preference.",
    )
    echoes: int = Field(1, ge=1, le=100, description="C-ECHO requests sent on the association.")
    tls: ProbeTlsSettings | None = Field(None, description="TLS; absent means plain TCP.")


_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


def _check_probe_target(value: str) -> str:
    """A network in CIDR form (an address alone is a /32 or /128), or a host name, normalised."""
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text))
    except ValueError as exc:
        if "/" in text or ":" in text or text.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is not a network in CIDR form: {exc}") from None
    name = text.lower().removesuffix(".")
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{value!r} is neither a network in CIDR form (10.0.0.0/8) nor a host name")
    return name


ProbeTarget = Annotated[str, AfterValidator(_check_probe_target)]


class ProbeSettings(_Strict):
    """The /probe endpoint, which C-ECHOes other DICOM nodes for Prometheus (blackbox style)."""

    allowed_targets: list[ProbeTarget] = Field(
        default_factory=list,
        description="Networks (CIDR) and host names /probe may connect to; empty turns /probe off.",
    )
    max_concurrent: int = Field(
        4, ge=1, le=1000, description="Probes running at once; more are answered 429."
    )
    modules: dict[str, ProbeModuleSettings] = Field(
        default_factory=lambda: {"default": ProbeModuleSettings()},  # type: ignore[call-arg]
        description="Probe modules by name; 'default' always exists.",
    )

    @field_validator("modules")
    @classmethod
    def _default_module(cls, value: dict[str, ProbeModuleSettings]) -> dict[str, ProbeModuleSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", name):
                raise ValueError(f"module name {name!r} must be 1-32 letters, digits, '_', '.' or '-'")
        if "default" not in value:
            value = {"default": ProbeModuleSettings(), **value}  # type: ignore[call-arg]
        return value


class Settings(_Strict):
    """The whole configuration of one echo-scp process."""

    listeners: list[ListenerSettings] = Field(
        default_factory=lambda: [ListenerSettings()],  # type: ignore[call-arg]
        min_length=1,
        description="DICOM listeners.",
    )
    http: HttpSettings = Field(default_factory=HttpSettings)  # type: ignore[arg-type]
    log: LogSettings = Field(default_factory=LogSettings)  # type: ignore[arg-type]
    readiness: ReadinessSettings = Field(default_factory=ReadinessSettings)  # type: ignore[arg-type]
    liveness: LivenessSettings = Field(default_factory=LivenessSettings)  # type: ignore[arg-type]
    probe: ProbeSettings = Field(default_factory=ProbeSettings)  # type: ignore[arg-type]
    # 5 s, plus the abort step (daemon._ABORT_WAIT, 2 s), ends inside docker's and
    # podman's default 10 s stop timeout; more would end in SIGKILL there.
    shutdown_grace_period: Seconds = Field(
        5.0, description="Seconds active associations get to finish after SIGTERM."
    )

    @model_validator(mode="after")
    def _liveness_outlasts_self_checks(self) -> Settings:
        r = self.readiness
        if self.liveness.stall_timeout <= r.interval + r.timeout:
            raise _conflicts(
                [
                    (
                        ("liveness", "stall_timeout"),
                        f"must be longer than readiness.interval + readiness.timeout "
                        f"({r.interval + r.timeout:g} s), or a healthy listener looks stalled "
                        f"between two self-checks; got {self.liveness.stall_timeout:g} s",
                        [("readiness", "interval"), ("readiness", "timeout")],
                    )
                ]
            )
        return self

    @model_validator(mode="after")
    def _distinct_binds(self) -> Settings:
        problems: list[tuple[Loc, str, list[Loc]]] = []
        for index, item in enumerate(self.listeners):
            for other in range(index):
                if self.listeners[other].name == item.name:
                    problems.append(
                        (
                            ("listeners", index, "name"),
                            f"{item.name!r} is already used by listeners[{other}]",
                            [("listeners", other, "name")],
                        )
                    )
                    break
            for other in range(index):
                first = self.listeners[other]
                if _binds_overlap((first.host, first.port), (item.host, item.port)):
                    problems.append(
                        (
                            ("listeners", index, "port"),
                            f"{format_address(item.host, item.port)} overlaps listeners[{other}] "
                            f"({format_address(first.host, item.port)})",
                            [("listeners", other, "port")],
                        )
                    )
                    break
        http = self.http
        for index, item in enumerate(self.listeners):
            if http.enabled and _binds_overlap((http.host, http.port), (item.host, item.port)):
                problems.append(
                    (
                        ("http", "port"),
                        f"{format_address(http.host, http.port)} overlaps the DICOM port of "
                        f"listeners[{index}] ({format_address(item.host, item.port)})",
                        [("listeners", index, "port")],
                    )
                )
                break
        if problems:
            raise _conflicts(problems)
        return self

    _warnings: list[str] | None = PrivateAttr(None)

    @property
    def warnings(self) -> list[str]:
        """Lines about what loads but will not work as meant, from when the settings were loaded.

        Today: certificates outside their validity period. Like problems, each
        names the field and, when loaded from layers, the source that set it.
        """
        if self._warnings is None:
            return [_line(loc, message, [loc], None) for loc, message in self.notes()]
        return list(self._warnings)

    def notes(self, now: float | None = None) -> list[tuple[Loc, str]]:
        """(location, message) of each warning at ``now``."""
        listeners = [
            (("listeners", index, "tls", *loc), message)
            for index, item in enumerate(self.listeners)
            if item.tls is not None
            for loc, message in item.tls.validity_notes(now)
        ]
        http = self.http.tls.validity_notes(now) if self.http.tls is not None else []
        return listeners + [(("http", "tls", *loc), message) for loc, message in http]

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        return self.model_dump(mode="json")


def _binds_overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two (host, port) binds would fight over one port (0 never does)."""
    if a[1] != b[1] or a[1] == 0:
        return False
    ip_a, ip_b = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    # Linux refuses a specific address on a port that a wildcard of the same
    # family holds, and "::" is dual-stack by default, so it holds IPv4 too.
    if ip_a == ip_b or (ip_a.is_unspecified and (ip_a.version == ip_b.version or ip_a.version == 6)):
        return True
    return ip_b.is_unspecified and (ip_b.version == ip_a.version or ip_b.version == 6)


# Kubernetes injects these for a Service named echo-scp (or echo-scp-*) unless
# the pod sets enableServiceLinks: false; ECHO_SCP_PORT=tcp://10.0.0.7:11112
# would otherwise read as our port setting and stop the pod from starting.
_SERVICE_LINK_NAME = re.compile(
    r"ECHO_SCP_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_PORT = re.compile(r"ECHO_SCP_(?:[A-Z0-9_]+_)?PORT")
_SERVICE_LINK_VALUE = re.compile(r"(?:tcp|udp|sctp)://\S+:\d+")


def _is_service_link(name: str, value: str) -> bool:
    """Whether an ECHO_SCP_* variable is a Kubernetes service link, not a setting."""
    if _SERVICE_LINK_NAME.fullmatch(name):
        return True
    return bool(_SERVICE_LINK_PORT.fullmatch(name) and _SERVICE_LINK_VALUE.fullmatch(value.strip()))


# ---------------------------------------------------------------------------
# Layers: each source as values at locations, merged, then validated once


@dataclass(frozen=True)
class Assignment:
    """One value a source sets: where it goes, what it is, and which source it came from."""

    loc: Loc
    value: Any
    # Named at the end of a problem line; None for values from Python callers.
    source: str | None
    # For an environment string that its field's type cannot convert: what is
    # wrong, reported instead of strict mode's "Input should be a valid integer".
    unconverted: str | None = None


@dataclass(frozen=True)
class Layer:
    """The values one source sets. A later layer wins where it sets the same location.

    A table merges into the table below it key by key; a list or a plain
    value replaces what was there (``ECHO_SCP_LISTENERS`` replaces the file's
    listeners). An assignment at ``("listeners", 0, ...)`` goes into the first
    listener, which is created if the layers below have none.
    """

    assignments: tuple[Assignment, ...] = ()

    @classmethod
    def of(cls, items: Iterable[tuple[Loc, Any, str | None]], *, base: Path | None = None) -> Layer:
        """A layer of typed values; strings at path fields become paths, relative ones under ``base``."""
        return cls(
            tuple(
                Assignment(loc, _typed_paths(_annotation_at(loc), value, base), source)
                for loc, value, source in items
            )
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Layer:
        """The values of a TOML file, each naming the file; relative paths resolve against its folder."""
        # absolute(), not resolve(): the folder the operator named, even when the
        # file is a symlink (as Kubernetes mounts a ConfigMap's keys).
        path = Path(path).absolute()
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{path}: not a readable TOML file: {exc}"]) from None
        return cls.of((((key,), value, str(path)) for key, value in data.items()), base=path.parent)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Layer:
        """The ``ECHO_SCP_*`` variables, each naming itself; raises ConfigError for unknown or bad ones.

        Unknown names are refused rather than ignored, so that a typo such as
        ``ECHO_SCP_AE_TITEL`` cannot pass unnoticed.
        """
        problems: list[str] = []
        assignments: list[Assignment] = []
        for name, raw in sorted(environ.items()):
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV_VAR or _is_service_link(upper, raw):
                continue
            path = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
            loc: Loc = path if path[0] in Settings.model_fields else ("listeners", 0, *path)
            annotation = _annotation_at(loc)
            if annotation is None:
                problems.append(f"{name}: unknown setting {'.'.join(path)!r}")
                continue
            try:
                value, unconverted = _from_environment(raw, annotation)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                continue
            assignments.append(Assignment(loc, value, name, unconverted))
        if problems:
            raise ConfigError(problems)
        # The general before the specific: ECHO_SCP_LISTENERS before ECHO_SCP_PORT,
        # which then changes its first listener; ECHO_SCP_TLS before ECHO_SCP_TLS__CERT_FILE.
        assignments.sort(key=lambda item: len(item.loc))
        return cls(tuple(assignments))

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Any] | None = None,
        *,
        first_listener: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> Layer:
        """Typed values from Python: top-level fields, and fields of the first listener."""
        items: list[tuple[Loc, Any, str | None]] = [
            ((key,), value, source) for key, value in (values or {}).items()
        ]
        items += [(("listeners", 0, key), value, source) for key, value in (first_listener or {}).items()]
        return cls.of(items)


def _from_environment(raw: str, annotation: Any) -> tuple[Any, str | None]:
    """An environment string as a value for a field: (value, why it is not one, if so).

    Tables and lists of tables are JSON; a list of plain values is JSON or
    comma-separated; a plain value is converted as pydantic's lax mode would
    (``"104"`` to 104, ``"yes"`` to True). A string that does not convert is
    kept, with the reason, and reported at its location after validation.
    """
    members = _members(annotation)
    if _models(annotation) or any(get_origin(m) is dict or _models(_item(m)) for m in members):
        return _typed_paths(annotation, _json(raw), None), None
    if any(get_origin(m) is list for m in members):
        if raw.lstrip().startswith("["):
            return _json(raw), None
        return [item.strip() for item in raw.split(",") if item.strip()], None
    try:
        return _lax(_bare(annotation)).validate_python(raw), None
    except ValidationError as exc:
        return raw, _message(exc.errors(include_url=False)[0])


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None


@cache
def _lax(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly optional) type, without their Annotated constraints."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _bare(annotation: Any) -> Any:
    """The type without constraints or validators: what an environment string converts to."""
    members = tuple(_members(annotation))
    return members[0] if len(members) == 1 else Union[members]  # noqa: UP007  # built at run time


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _item(annotation: Any) -> Any:
    """The item type of a list type, or None."""
    lists = [m for m in _members(annotation) if get_origin(m) is list and get_args(m)]
    return get_args(lists[0])[0] if lists else None


def _value_type(annotation: Any) -> Any:
    """The value type of a ``dict[str, X]`` type (``probe.modules``), or None."""
    dicts = [m for m in _members(annotation) if get_origin(m) is dict and len(get_args(m)) == 2]
    return get_args(dicts[0])[1] if dicts else None


def _annotation_at(loc: Loc) -> Any | None:
    """The type of the setting at ``loc`` (``("listeners", 0, "port")``), or None if there is none."""
    annotation: Any = Settings
    for part in loc:
        if isinstance(part, int):
            annotation = _item(annotation)
            if annotation is None:
                return None
            continue
        models = _models(annotation)
        if not models:
            annotation = _value_type(annotation)
            if annotation is None:
                return None
            continue
        if part not in models[0].model_fields:
            return None
        annotation = models[0].model_fields[part].annotation
    return annotation


def _typed_paths(annotation: Any, value: Any, base: Path | None) -> Any:
    """``value`` with its strings at path fields made paths, relative ones joined to ``base``."""
    if isinstance(value, str):
        if not any(isinstance(m, type) and issubclass(m, Path) for m in _members(annotation)):
            return value
        path = Path(value)
        return base / path if base is not None and not path.is_absolute() else path
    if isinstance(value, Mapping):
        models = _models(annotation)
        if not models and (values := _value_type(annotation)) is not None:
            return {key: _typed_paths(values, item, base) for key, item in value.items()}
        fields = models[0].model_fields if models else {}
        return {
            key: _typed_paths(fields[key].annotation, item, base) if key in fields else item
            for key, item in value.items()
        }
    if isinstance(value, list):
        item_type = _item(annotation)
        return [_typed_paths(item_type, item, base) for item in value]
    return value


class MergedLayers:
    """Layers merged into one mapping, remembering which source set each location."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.data: dict[str, Any] = {}
        self._sources: dict[Loc, str | None] = {}
        self._unconverted: dict[Loc, str] = {}
        for layer in layers:
            for item in layer.assignments:
                self._assign(item.loc, item.value, item.source)
                if item.unconverted is not None:
                    self._unconverted[item.loc] = item.unconverted

    def validate(self) -> Settings:
        """The settings, validated once in strict mode; raises ConfigError naming every problem."""
        try:
            settings = Settings.model_validate(self.data, strict=True)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, self)) from None
        settings._warnings = [_line(loc, message, [loc], self) for loc, message in settings.notes()]
        return settings

    def sources(self, locs: Iterable[Loc]) -> list[str]:
        """The sources that set these locations or anything inside them, each named once.

        A location nothing set inside (a required field left out) is blamed on
        the source that set the nearest table around it.
        """
        found: dict[str, None] = {}
        for loc in locs:
            hits = [source for at, source in self._sources.items() if at[: len(loc)] == loc]
            if not hits:
                hits = next(
                    (
                        [self._sources[loc[:end]]]
                        for end in range(len(loc) - 1, 0, -1)
                        if loc[:end] in self._sources
                    ),
                    [],
                )
            found.update((source, None) for source in hits if source is not None)
        return list(found)

    def unconverted(self, loc: Loc) -> str | None:
        """Why the environment string at ``loc`` is not a value of its field's type, if it is not."""
        return self._unconverted.get(loc)

    def _assign(self, loc: Loc, value: Any, source: str | None) -> None:
        node, key = self._slot(loc, source)
        if isinstance(value, Mapping):
            if not (_holds(node, key) and isinstance(node[key], dict)):
                self._forget(loc)
                _put(node, key, {})
            self._sources[loc] = source
            for name, item in value.items():
                self._assign((*loc, name), item, source)
            return
        self._forget(loc)
        _put(node, key, _copy(value))
        self._record(loc, value, source)

    def _slot(self, loc: Loc, source: str | None) -> tuple[Any, int | str]:
        """The container holding ``loc`` and its key there, creating containers on the way."""
        node: Any = self.data
        for depth, part in enumerate(loc[:-1]):
            kind: type = list if isinstance(loc[depth + 1], int) else dict
            if not (_holds(node, part) and isinstance(node[part], kind)):
                self._forget(loc[: depth + 1])
                _put(node, part, kind())
                self._sources[loc[: depth + 1]] = source
            node = node[part]
        return node, loc[-1]

    def _record(self, loc: Loc, value: Any, source: str | None) -> None:
        self._sources[loc] = source
        if isinstance(value, Mapping):
            for key, item in value.items():
                self._record((*loc, key), item, source)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self._record((*loc, index), item, source)

    def _forget(self, loc: Loc) -> None:
        """Drop what is known about ``loc`` and everything inside it: a new value replaces it."""
        for known in (self._sources, self._unconverted):
            for at in [at for at in known if at[: len(loc)] == loc]:
                del known[at]


def _holds(node: Any, key: int | str) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return key in node


def _put(node: Any, key: int | str, value: Any) -> None:
    if isinstance(node, list):
        assert isinstance(key, int)
        # A first-listener setting with no listener below it: the listener
        # starts from the defaults.
        while len(node) <= key:
            node.append({})
    node[key] = value


def _copy(value: Any) -> Any:
    """A copy of the containers in ``value``, so that merging never changes a caller's data."""
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    first_listener: Mapping[str, Any] | None = None,
    flags: Layer | None = None,
) -> Settings:
    """Build the settings from a config file, the environment and the caller's values.

    The layers, lowest first: ``config_file`` (None: no file; cli.py picks the
    default one), ``environ`` (default ``os.environ``), then ``overrides``
    (top-level fields, typed) and ``first_listener`` (fields of the first
    listener) from Python callers, then ``flags``, the command line's layer.
    Raises :class:`ConfigError` naming every problem.
    """
    layers: list[Layer] = []
    if config_file is not None:
        layers.append(Layer.from_file(config_file))
    layers.append(Layer.from_environ(os.environ if environ is None else environ))
    layers.append(Layer.from_values(overrides, first_listener=first_listener))
    if flags is not None:
        layers.append(flags)
    return MergedLayers(layers).validate()


def format_validation_error(
    exc: ValidationError, merged: MergedLayers | None = None, *, prefix: Loc = ()
) -> list[str]:
    """One line per problem: ``listeners[1].tls.cert_file: <message> (from <source>)``.

    With ``merged``, each line ends by naming the sources (the file, an
    environment variable, a flag) that set the values the problem is about.
    ``prefix`` is where the validated model sits, for a part validated alone.
    """
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        where = (*prefix, *_clean_loc(error["loc"]))
        if error["type"] == _CONFLICT:
            for loc, message, related in error.get("ctx", {})["problems"]:
                at = (*where, *loc)
                lines.append(_line(at, message, [at, *((*where, *other) for other in related)], merged))
            continue
        message = (merged.unconverted(where) if merged is not None else None) or _message(error)
        lines.extend(_line(where, line, [where], merged) for line in message.splitlines())
    return lines


def _line(loc: Loc, message: str, involved: Sequence[Loc], merged: MergedLayers | None) -> str:
    sources = merged.sources(involved) if merged is not None and loc else []
    suffix = f" (from {', '.join(sources)})" if sources else ""
    where = _format_loc(loc)
    return f"{where}: {message}{suffix}" if where else f"{message}{suffix}"


# Strict mode's "wrong type" errors; the input's own type is added to them,
# since `port = "104"` reads as an integer to a person.
_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type", "string_type"})


def _message(error: ErrorDetails) -> str:
    """Pydantic's message, reworded where it would not tell an operator what to fix."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "required setting is missing"
    if kind == "path_not_file":
        path = str(error["input"])
        return f"not a regular file: {path!r}" if Path(path).exists() else f"no such file: {path!r}"
    if kind == "too_short" and error.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    message = error["msg"].removeprefix("Value error, ")
    if kind in _TYPE_ERRORS:
        got = _kind_of(error["input"])
        if got is not None:
            message = f"{message}, not {got}"
    return message


def _kind_of(value: Any) -> str | None:
    """A value's type as the config file spells it: ``a string ('104')``, ``a boolean (true)``."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return None


def _clean_loc(loc: tuple[int | str, ...]) -> Loc:
    """The location without pydantic's validator steps (``function-after[...]``)."""
    return tuple(
        part
        for part in loc
        if isinstance(part, int) or not part.startswith(("function-after[", "function-before["))
    )


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text
