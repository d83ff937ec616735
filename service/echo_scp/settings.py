"""Configuration: the one model that defines every option, and how it is loaded.

Every option exists exactly once, as a field below. The config file, the
environment and the command line are views of these fields:

* config file (TOML): the field names as keys, ``[[listeners]]`` tables;
* environment: ``ECHO_SCP_<FIELD>`` with ``__`` between nesting levels
  (``ECHO_SCP_HTTP__PORT``), a JSON list for ``ECHO_SCP_LISTENERS``, and, for
  the common single-listener case, any listener field without the
  ``LISTENERS`` part (``ECHO_SCP_AE_TITLE``, ``ECHO_SCP_PORT``,
  ``ECHO_SCP_TLS__CERT_FILE``), which applies to the first listener;
* command line: ``echo-scp serve`` flags, which also apply to the first
  listener.

Precedence, highest first: command line, environment, file, defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from echo_scp.transfer_syntax import DEFAULT_TRANSFER_SYNTAXES, resolve_transfer_syntax

ENV_PREFIX = "ECHO_SCP_"
CONFIG_ENV_VAR = "ECHO_SCP_CONFIG"
# Looked up in order when neither --config nor ECHO_SCP_CONFIG names a file.
DEFAULT_CONFIG_FILES = (Path("config/echo-scp.toml"), Path("/etc/echo-scp/echo-scp.toml"))
# Pseudo key carrying the flat single-listener overrides from the environment
# and the command line until they are applied to the first listener.
_FIRST_LISTENER_KEY = "first_listener_overrides"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _check_ae_title(value: str) -> str:
    """Apply PS3.5's AE VR rules; leading and trailing spaces are not significant."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("AE title must not contain control characters")
    if "\\" in value:
        raise ValueError("AE title must not contain a backslash")
    if not value.isascii():
        raise ValueError("AE title must use the DICOM default character repertoire (ASCII)")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    if len(stripped) > 16:
        raise ValueError(f"AE title must be at most 16 characters (got {len(stripped)})")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_ip_literal(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IPv4 or IPv6 address literal, got {value!r}") from None
    return value


IPLiteral = Annotated[str, AfterValidator(_check_ip_literal)]


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


class TlsSettings(_Strict):
    """TLS for one listener (DICOM PS3.15 secure transport, BCP 195 profile)."""

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

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # TOML reads an unquoted `min_version = 1.3` as a float; reading it as
        # "1.3" beats rejecting it with "Input should be '1.2' or '1.3'".
        return str(value) if isinstance(value, float) else value

    @model_validator(mode="after")
    def _loadable(self) -> TlsSettings:
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
        # Imported here: tls.py needs these settings' types only for hints.
        from echo_scp.tls import self_check_context, server_context

        try:
            server_context(self)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(_tls_load_problem(exc, self.cert_file, self.key_file, self.ca_file)) from None
        if self.client_certificates != "none" and self.self_check_cert_file is not None:
            try:
                self_check_context(self)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    _tls_load_problem(
                        exc, self.self_check_cert_file, self.self_check_key_file, None, "self_check_"
                    )
                ) from None
        return self


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


def _problem(loc: tuple[int | str, ...], message: str, value: Any) -> InitErrorDetails:
    """A problem at ``loc`` below the model that raises it (see ListenerSettings._peers_consistent)."""
    return InitErrorDetails(type=PydanticCustomError("invalid", message), loc=loc, input=value)


class ListenerSettings(_Strict):
    """One DICOM listener: an address, an AE title and its association policy."""

    name: str = Field(
        "dicom",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$",
        description="Label used in metrics and logs.",
    )
    host: IPLiteral = Field("0.0.0.0", description="Bind address (IPv4 or IPv6 literal).")
    port: Port = Field(11112, description="TCP port; 0 picks a free one.")
    ae_title: AETitle = Field("ECHOSCP", description="This listener's AE title.")
    transfer_syntaxes: list[str] = Field(
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

    @field_validator("transfer_syntaxes")
    @classmethod
    def _resolve_syntaxes(cls, value: list[str]) -> list[str]:
        uids = [resolve_transfer_syntax(item) for item in value]
        if len(set(uids)) != len(uids):
            raise ValueError("transfer syntaxes must not repeat")
        return uids

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu_floor(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError("max_pdu_size must be 0 (unlimited) or at least 1024")
        return value

    @model_validator(mode="after")
    def _peers_consistent(self) -> ListenerSettings:
        problems: list[InitErrorDetails] = []
        first_seen: dict[str, int] = {}
        anywhere = set(self.allowed_calling_ae_titles)
        for index, peer in enumerate(self.peers):
            where = ("peers", index)
            if peer.ae_title in first_seen:
                problems.append(
                    _problem(
                        (*where, "ae_title"),
                        f"{peer.ae_title!r} is already used by peers[{first_seen[peer.ae_title]}]",
                        peer.ae_title,
                    )
                )
            else:
                first_seen[peer.ae_title] = index
            if peer.ae_title in anywhere:
                problems.append(
                    _problem(
                        (*where, "ae_title"),
                        f"{peer.ae_title!r} is also in allowed_calling_ae_titles (any network); "
                        "list it in one place",
                        peer.ae_title,
                    )
                )
            limit = peer.max_associations
            if limit is not None and limit > self.max_associations:
                problems.append(
                    _problem(
                        (*where, "max_associations"),
                        f"{limit} is above the listener's max_associations ({self.max_associations})",
                        limit,
                    )
                )
        if problems:
            # A ValidationError raised here keeps each problem's own location
            # (listeners[0].peers[1].ae_title) instead of the listener's.
            raise ValidationError.from_exception_data(type(self).__name__, problems)
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


class HttpTlsSettings(_Strict):
    """TLS for the HTTP endpoint, as the Prometheus exporter-toolkit's ``tls_server_config``."""

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

    @model_validator(mode="after")
    def _loadable(self) -> HttpTlsSettings:
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
        from echo_scp.tls import http_server_context

        try:
            http_server_context(self)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(_tls_load_problem(exc, self.cert_file, self.key_file, None)) from None
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

    @model_validator(mode="after")
    def _users_file_loads(self) -> HttpSettings:
        path = self.basic_auth_users_file
        if path is not None:
            where = ("basic_auth_users_file",)
            try:
                users = read_users_file(path)
            except ValueError as exc:
                problem = _problem(where, str(exc), str(path))
                raise ValidationError.from_exception_data(type(self).__name__, [problem]) from None
            both = sorted(set(users) & set(self.basic_auth_users))
            if both:
                message = (
                    f"{', '.join(map(repr, both))} also in basic_auth_users; list each user in one place"
                )
                problem = _problem(where, message, str(path))
                raise ValidationError.from_exception_data(type(self).__name__, [problem])
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
        15.0, description="A listener is unready when its last success is older than this."
    )


class Settings(BaseSettings):
    """The whole configuration of one echo-scp process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    listeners: list[ListenerSettings] = Field(
        default_factory=lambda: [ListenerSettings()],  # type: ignore[call-arg]
        min_length=1,
        description="DICOM listeners.",
    )
    http: HttpSettings = Field(default_factory=HttpSettings)  # type: ignore[arg-type]
    log: LogSettings = Field(default_factory=LogSettings)  # type: ignore[arg-type]
    readiness: ReadinessSettings = Field(default_factory=ReadinessSettings)  # type: ignore[arg-type]
    shutdown_grace_period: Seconds = Field(
        10.0, description="Seconds active associations get to finish after SIGTERM."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_first_listener_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or _FIRST_LISTENER_KEY not in data:
            return data
        data = dict(data)
        overrides = data.pop(_FIRST_LISTENER_KEY)
        listeners = list(data.get("listeners") or [{}])
        first = listeners[0]
        if isinstance(first, BaseModel):
            first = first.model_dump()
        if isinstance(first, dict):
            listeners[0] = _deep_merge(first, overrides)
        data["listeners"] = listeners
        return data

    @model_validator(mode="after")
    def _unique_listeners(self) -> Settings:
        problems = []
        for index, item in enumerate(self.listeners):
            for other in range(index):
                if self.listeners[other].name == item.name:
                    problems.append(
                        f"listeners[{index}].name: {item.name!r} is already used by listeners[{other}]"
                    )
                    break
            for other in range(index):
                if _binds_overlap(self.listeners[other], item):
                    problems.append(
                        f"listeners[{index}].port: {_hostport(item.host, item.port)} overlaps "
                        f"listeners[{other}] ({_hostport(self.listeners[other].host, item.port)})"
                    )
                    break
        if problems:
            # One line per problem; format_validation_error splits them.
            raise ValueError("\n".join(problems))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _sources(settings_cls, init_settings, os.environ)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        return self.model_dump(mode="json")


def _binds_overlap(a: ListenerSettings, b: ListenerSettings) -> bool:
    """Whether two listeners would fight over one port (0 never does)."""
    if a.port != b.port or a.port == 0:
        return False
    ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    # Linux refuses a specific address on a port that a wildcard of the same
    # family holds, and "::" is dual-stack by default, so it holds IPv4 too.
    if ip_a == ip_b or (ip_a.is_unspecified and (ip_a.version == ip_b.version or ip_a.version == 6)):
        return True
    return ip_b.is_unspecified and (ip_b.version == ip_a.version or ip_b.version == 6)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_annotation(model: type[BaseModel], path: list[str]) -> Any | None:
    """The annotation of the field at ``path`` under ``model``, or None if unknown."""
    annotation: Any = model
    for part in path:
        candidates = [annotation, *get_args(annotation)]
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not models or part not in models[0].model_fields:
            return None
        info: FieldInfo = models[0].model_fields[part]
        annotation = info.annotation
    return annotation


class _FlatEnvSource(PydanticBaseSettingsSource):
    """Reads ``ECHO_SCP_<LISTENER FIELD>`` variables and rejects unknown ones.

    pydantic-settings' own environment source handles the top-level fields; it
    silently ignores names it does not know, which would hide a typo such as
    ``ECHO_SCP_AE_TITEL``, so this source refuses them.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None):
        super().__init__(settings_cls)
        self._environ = os.environ if environ is None else environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ does the work

    def __call__(self) -> dict[str, Any]:
        problems: list[str] = []
        overrides: dict[str, Any] = {}
        for name, raw in sorted(self._environ.items()):
            if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV_VAR:
                continue
            if _is_service_link(name.upper(), raw):
                continue
            path = name[len(ENV_PREFIX) :].lower().split("__")
            if path[0] in self.settings_cls.model_fields:
                top = _field_annotation(self.settings_cls, path)
                if top is None:
                    problems.append(f"{name}: unknown setting {'.'.join(path)!r}")
                elif _is_structured(top):
                    # pydantic-settings would fail on bad JSON with a SettingsError
                    # that names neither the variable nor what is wrong.
                    try:
                        json.loads(raw)
                    except json.JSONDecodeError as exc:
                        problems.append(f"{name}: invalid JSON: {exc}")
                continue  # pydantic-settings' env source reads it
            annotation = _field_annotation(ListenerSettings, path)
            if annotation is None:
                problems.append(f"{name}: unknown setting {'.'.join(path)!r}")
                continue
            try:
                value = _parse_env_value(raw, annotation)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                continue
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        if problems:
            raise ConfigError(problems)
        return {_FIRST_LISTENER_KEY: overrides} if overrides else {}


def _is_structured(annotation: Any) -> bool:
    """Whether pydantic-settings expects JSON for a field of this type."""
    if get_origin(annotation) in (list, dict):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


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


def _parse_env_value(raw: str, annotation: Any) -> Any:
    is_list = get_origin(annotation) is list
    if raw.lstrip().startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
    if is_list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def find_config_file(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, then $ECHO_SCP_CONFIG, then the defaults."""
    chosen = explicit or environ.get(CONFIG_ENV_VAR)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            source = "--config" if explicit else CONFIG_ENV_VAR
            raise ConfigError([f"{source}: config file {str(path)!r} does not exist"])
        return path
    return next((p for p in DEFAULT_CONFIG_FILES if p.is_file()), None)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    first_listener: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from file, environment and command-line overrides.

    ``overrides`` are top-level fields (nested dicts allowed); ``first_listener``
    holds listener fields that apply to the first listener. Raises
    :class:`ConfigError` naming every problem.
    """
    environ = os.environ if environ is None else environ
    path = find_config_file(config_file, environ)
    if path is not None:
        _check_toml(path)
    init: dict[str, Any] = dict(overrides or {})
    if first_listener:
        init[_FIRST_LISTENER_KEY] = dict(first_listener)
    bound: type[Settings] = type(
        "Settings",
        (Settings,),
        {
            "model_config": {**Settings.model_config, "toml_file": path},
            "__module__": __name__,
            "settings_customise_sources": classmethod(
                lambda cls, settings_cls, init_settings, **_: _sources(settings_cls, init_settings, environ)
            ),
        },
    )
    try:
        return bound(**init)
    except ValidationError as exc:
        origin = _env_origin(environ, overrides or {}, first_listener or {})
        raise ConfigError(format_validation_error(exc, origin=origin)) from None
    except SettingsError as exc:
        # A source failed before validation; _FlatEnvSource catches the known cases.
        raise ConfigError([str(exc)]) from None


def _sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, environ: Mapping[str, str]
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources, highest precedence first: flags, flat listener env, env, TOML file."""
    return (
        init_settings,
        _FlatEnvSource(settings_cls, environ),
        _environ_source(settings_cls, environ),
        TomlConfigSettingsSource(settings_cls),
    )


def _environ_source(
    settings_cls: type[BaseSettings], environ: Mapping[str, str]
) -> PydanticBaseSettingsSource:
    source = EnvSettingsSource(
        settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__"
    )
    source.env_vars = {k.lower(): v for k, v in environ.items()}
    return source


def _env_origin(
    environ: Mapping[str, str], overrides: Mapping[str, Any], first_listener: Mapping[str, Any]
) -> Callable[[tuple[int | str, ...]], str | None]:
    """Which environment variable supplied the value at a location, if one did.

    Follows the precedence of the sources: a value the caller passed in
    (command-line flags) hides the environment, and the flat single-listener
    variables sit on top of ``ECHO_SCP_LISTENERS`` for the first listener.
    """
    names = {name.upper(): name for name in environ if name.upper().startswith(ENV_PREFIX)}

    def variable(parts: tuple[int | str, ...]) -> str | None:
        keys: list[str] = []
        for part in parts:
            if not isinstance(part, str):
                break
            keys.append(part)
        # The most specific wins: ECHO_SCP_TLS__CERT_FILE before ECHO_SCP_TLS.
        for end in range(len(keys), 0, -1):
            found = names.get(ENV_PREFIX + "__".join(keys[:end]).upper())
            if found is not None:
                return found
        return None

    def origin(loc: tuple[int | str, ...]) -> str | None:
        if loc[:2] == ("listeners", 0) and len(loc) > 2:
            if _sets(first_listener, loc[2:]):
                return None
            flat = variable(loc[2:])
            if flat is not None:
                return flat
        return None if _sets(overrides, loc) else variable(loc)

    return origin


def _sets(data: Mapping[str, Any], loc: tuple[int | str, ...]) -> bool:
    """Whether ``data`` provides the value at ``loc`` (or a list or value above it)."""
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def _check_toml(path: Path) -> None:
    import tomllib

    try:
        with path.open("rb") as handle:
            tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path}: not a readable TOML file: {exc}"]) from None


def format_validation_error(
    exc: ValidationError,
    *,
    origin: Callable[[tuple[int | str, ...]], str | None] | None = None,
) -> list[str]:
    """One line per problem: ``listeners[1].tls.cert_file: <message>``.

    ``origin`` maps an error location to the environment variable that set the
    value, which is then named at the end of the line: ``(from ECHO_SCP_PORT)``.
    """
    lines = []
    for error in exc.errors(include_url=False):
        where = _clean_loc(error["loc"])
        loc = _format_loc(where)
        message = _message(error)
        source = origin(where) if origin is not None and where else None
        suffix = f" (from {source})" if source else ""
        for line in message.splitlines():
            lines.append(f"{loc}: {line}{suffix}" if loc else line)
    return lines


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
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The location without pydantic's validator steps (``function-after[...]``)."""
    return tuple(
        part
        for part in loc
        if isinstance(part, int) or not part.startswith(("function-after[", "function-before["))
    )


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text
