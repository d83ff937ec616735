"""The configuration: invalid files and variables, layers and their sources, typing, check-config."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from echo_scp import cli
from echo_scp.settings import (
    ConfigError,
    HttpSettings,
    ListenerSettings,
    LogSettings,
    ProbeModuleSettings,
    ProbeSettings,
    ReadinessSettings,
    Settings,
    TlsSettings,
    load_settings,
)
from tests.conftest import REPO, free_port, make_settings, mutual_tls, wait_for

INVALID = REPO / "tests" / "configs" / "invalid"
SHIPPED = REPO / "config" / "echo-scp.toml"
EMPTY = REPO / "tests" / "empty.toml"
EXPECTED: dict[str, list[str]] = tomllib.loads((INVALID / "expected.toml").read_text())
HEADING = "echo-scp: invalid configuration:"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's ECHO_SCP_* variables and ./config/echo-scp.toml out of every test."""
    for name in list(os.environ):
        if name.upper().startswith("ECHO_SCP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(folder: Path, text: str, name: str = "echo-scp.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems(config_file: Path | str | None, **kwargs: Any) -> list[str]:
    """The problem lines load_settings reports; fails the test if it accepts the configuration."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file, **kwargs)
    return caught.value.problems


def check_config(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run ``echo-scp check-config ARGV``; (exit status, parsed stdout or None, stderr)."""
    status = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out else None), err


@pytest.fixture(scope="session")
def encrypted_key(tls_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server key of ``tls_files``, encrypted with the password "secret" (PKCS#8)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls_files["key"].read_bytes(), password=None)
    path = tmp_path_factory.mktemp("encrypted") / "server-encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def tls_listener(cert: Path, key: Path, extra: str = "") -> str:
    return f'[[listeners]]\nport = 2762\n[listeners.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n{extra}'


# ---------------------------------------------------------------------------
# Invalid files and variables, with the exact lines an operator reads


def test_every_invalid_file_has_expected_problems() -> None:
    """The folder of invalid files and the table of their expected problems list the same files."""
    files = {p.name for p in INVALID.glob("*.toml")} - {"expected.toml"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_file_reports_exact_problems(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Each invalid config file is rejected with exactly the problem lines listed in expected.toml."""
    source = INVALID / name
    text = source.read_text()
    substitutions = {"@FILE@": str(source), "@DIR@": str(source.parent)}
    if "@TLS@" in text:
        tls_files: dict[str, Path] = request.getfixturevalue("tls_files")
        substitutions["@TLS@"] = str(tls_files["cert"].parent)
        source = write(tmp_path, text.replace("@TLS@", substitutions["@TLS@"]), name)
        substitutions["@FILE@"], substitutions["@DIR@"] = str(source), str(source.parent)

    def render(line: str) -> str:
        for placeholder, value in substitutions.items():
            line = line.replace(placeholder, value)
        return line

    assert problems(source) == [render(line) for line in EXPECTED[name]]


# Bad variables and the exact lines they produce.
BAD_ENVIRONMENTS: list[tuple[dict[str, str], list[str]]] = [
    ({"ECHO_SCP_AE_TITEL": "X"}, ["ECHO_SCP_AE_TITEL: unknown setting 'ae_titel'"]),
    ({"ECHO_SCP_HTTP__PROT": "1"}, ["ECHO_SCP_HTTP__PROT: unknown setting 'http.prot'"]),
    (
        {"ECHO_SCP_LISTENERS__0__PORT": "1"},
        ["ECHO_SCP_LISTENERS__0__PORT: unknown setting 'listeners.0.port'"],
    ),
    (
        {"ECHO_SCP_PORT": "abc"},
        [
            "listeners[0].port: Input should be a valid integer, unable to parse string as an integer "
            "(from ECHO_SCP_PORT)"
        ],
    ),
    (
        {"echo_scp_port": "abc"},
        [
            "listeners[0].port: Input should be a valid integer, unable to parse string as an integer "
            "(from echo_scp_port)"
        ],
    ),
    (
        {"ECHO_SCP_LISTENERS": "not json"},
        ["ECHO_SCP_LISTENERS: invalid JSON: Expecting value: line 1 column 1 (char 0)"],
    ),
    (
        {"ECHO_SCP_HTTP": "port=1"},
        ["ECHO_SCP_HTTP: invalid JSON: Expecting value: line 1 column 1 (char 0)"],
    ),
    (
        {"ECHO_SCP_ALLOWED_CALLING_AE_TITLES": '["A",'},
        ["ECHO_SCP_ALLOWED_CALLING_AE_TITLES: invalid JSON: Expecting value: line 1 column 6 (char 5)"],
    ),
    (
        {"ECHO_SCP_LISTENERS": '[{"name": "a"}, {"name": "b", "port": 70000}]'},
        ["listeners[1].port: Input should be less than or equal to 65535 (from ECHO_SCP_LISTENERS)"],
    ),
    (
        {"ECHO_SCP_ALLOWED_CALLING_AE_TITLES": "A,B\\C"},
        [
            "listeners[0].allowed_calling_ae_titles[1]: AE title must not contain a backslash "
            "(from ECHO_SCP_ALLOWED_CALLING_AE_TITLES)"
        ],
    ),
    (
        {
            "ECHO_SCP_TLS__CERT_FILE": "/no/tls.crt",
            "ECHO_SCP_TLS__KEY_FILE": "/no/tls.key",
        },
        [
            "listeners[0].tls.cert_file: no such file: '/no/tls.crt' (from ECHO_SCP_TLS__CERT_FILE)",
            "listeners[0].tls.key_file: no such file: '/no/tls.key' (from ECHO_SCP_TLS__KEY_FILE)",
        ],
    ),
    (
        {"ECHO_SCP_LOG__LEVEL": "loud"},
        [
            "log.level: Input should be 'critical', 'error', 'warning', 'info' or 'debug' "
            "(from ECHO_SCP_LOG__LEVEL)"
        ],
    ),
    (
        {"ECHO_SCP_SHUTDOWN_GRACE_PERIOD": "-1"},
        ["shutdown_grace_period: Input should be greater than 0 (from ECHO_SCP_SHUTDOWN_GRACE_PERIOD)"],
    ),
    (
        {"ECHO_SCP_REQUIRE_CALLED_AE_TITLE": "maybe"},
        [
            "listeners[0].require_called_ae_title: Input should be a valid boolean, "
            "unable to interpret input (from ECHO_SCP_REQUIRE_CALLED_AE_TITLE)"
        ],
    ),
    (
        {"ECHO_SCP_HTTP": '{"port": "9000"}'},
        ["http.port: Input should be a valid integer, not a string ('9000') (from ECHO_SCP_HTTP)"],
    ),
]


@pytest.mark.parametrize(
    ("environ", "expected"), BAD_ENVIRONMENTS, ids=["+".join(environ) for environ, _ in BAD_ENVIRONMENTS]
)
def test_invalid_environment_reports_exact_problems(environ: dict[str, str], expected: list[str]) -> None:
    """Each bad ECHO_SCP_* variable is rejected with a line naming the variable, and the field it sets."""
    assert problems(EMPTY, environ=environ) == expected


@pytest.mark.parametrize("name", ["", "a b", "x" * 33, "dicom/2", "d\u00e9"])
def test_bad_listener_name_is_named(tmp_path: Path, name: str) -> None:
    """A listener name outside the rule (1-32 of A-Z a-z 0-9 _ . -, no leading _ . -) is one problem line."""
    config = write(tmp_path, f"[[listeners]]\nname = {name!r}\n".replace("'", '"'))
    rule = "must be 1 to 32 letters, digits, '_', '.' or '-', starting with a letter or digit"
    assert problems(config) == [f"listeners[0].name: {rule}, got {name!r} (from {config})"]


@pytest.mark.parametrize("name", ["dicom", "D", "a.b-c_d", "9" * 32])
def test_good_listener_names_load(tmp_path: Path, name: str) -> None:
    """Names within the rule load as they are."""
    config = write(tmp_path, f'[[listeners]]\nname = "{name}"\n')
    assert load_settings(config, environ={}).listeners[0].name == name


def test_problem_names_the_source_that_set_the_value(tmp_path: Path) -> None:
    """A problem names the file or variable whose value won, and nothing for a value from Python."""
    config = write(tmp_path, "[[listeners]]\nport = 70000\n")
    in_range = "listeners[0].port: Input should be less than or equal to 65535"
    assert problems(config, environ={"ECHO_SCP_AE_TITLE": "OTHER"}) == [f"{in_range} (from {config})"]
    assert problems(config, environ={"ECHO_SCP_PORT": "70001"}) == [
        "listeners[0].port: Input should be less than or equal to 65535 (from ECHO_SCP_PORT)"
    ]
    assert problems(config, environ={"ECHO_SCP_PORT": "104"}, first_listener={"port": 70000}) == [in_range]
    assert problems(EMPTY, environ={"ECHO_SCP_HTTP__PORT": "1"}, overrides={"http": {"port": 70000}}) == [
        "http.port: Input should be less than or equal to 65535"
    ]


def test_problem_names_the_flag_that_set_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag value is blamed on the flag, even when the file and the environment set the field too."""
    config = write(tmp_path, '[[listeners]]\nae_title = "FILE"\n')
    monkeypatch.setenv("ECHO_SCP_AE_TITLE", "ENV")
    status, effective, err = check_config(capsys, "--config", str(config), "-aet", "ABCDEFGHIJKLMNOPQ")
    assert (status, effective) == (2, None)
    assert err.splitlines() == [
        HEADING,
        "  listeners[0].ae_title: AE title must be at most 16 characters (got 17) (from --ae-title)",
    ]


def test_problem_about_a_table_names_every_source_inside_it(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    """A TLS problem about a certificate from the file and a key from a variable names both."""
    config = write(tmp_path, f'[[listeners]]\n[listeners.tls]\ncert_file = "{tls_files["cert"]}"\n')
    environ = {"ECHO_SCP_TLS__KEY_FILE": str(tls_files["client_key"])}
    assert problems(config, environ=environ) == [
        f"listeners[0].tls: key_file does not match cert_file (from {config}, ECHO_SCP_TLS__KEY_FILE)"
    ]
    assert problems(config) == [f"listeners[0].tls.key_file: required setting is missing (from {config})"]


def test_combination_names_the_sources_of_both_values(tmp_path: Path) -> None:
    """An HTTP port that a variable moved onto the file's DICOM port names the file and the variable."""
    config = write(tmp_path, '[[listeners]]\nhost = "127.0.0.1"\nport = 4242\n')
    assert problems(config, environ={"ECHO_SCP_HTTP__PORT": "4242"}) == [
        "http.port: 0.0.0.0:4242 overlaps the DICOM port of listeners[0] (127.0.0.1:4242) "
        f"(from ECHO_SCP_HTTP__PORT, {config})"
    ]
    assert problems(EMPTY, environ={"ECHO_SCP_READINESS__INTERVAL": "20"}) == [
        "readiness.max_age: must be at least interval + timeout (20 s + 3 s = 23 s), or /readyz fails "
        "between two successful self-checks; got 15 s (from ECHO_SCP_READINESS__INTERVAL)"
    ]


def test_invalid_transfer_syntax_uid_is_rejected() -> None:
    """A malformed UID among the transfer syntaxes is rejected with a line quoting it, and no warning."""
    lines = problems(EMPTY, overrides={"listeners": [{"transfer_syntaxes": ["1.2.03"]}]})
    assert lines == ["listeners[0].transfer_syntaxes: '1.2.03' is not a valid UID"]


# ---------------------------------------------------------------------------
# Precedence: flag > environment > file > default, per field


def _port(settings: Settings) -> Any:
    return settings.listeners[0].port


def _ae_title(settings: Settings) -> Any:
    return settings.listeners[0].ae_title


def _http_port(settings: Settings) -> Any:
    return settings.http.port


def _log_level(settings: Settings) -> Any:
    return settings.log.level


# field: (read it, default, (file text, value), (environment, value), (load_settings flag kwargs, value))
LAYERS: dict[
    str, tuple[Callable[[Settings], Any], Any, tuple[Any, Any], tuple[Any, Any], tuple[Any, Any]]
] = {
    "listener port": (
        _port,
        11112,
        ("[[listeners]]\nport = 1001\n", 1001),
        ({"ECHO_SCP_PORT": "1002"}, 1002),
        ({"first_listener": {"port": 1003}}, 1003),
    ),
    "listener ae_title": (
        _ae_title,
        "ECHOSCP",
        ('[[listeners]]\nae_title = "FILE"\n', "FILE"),
        ({"ECHO_SCP_AE_TITLE": "ENV"}, "ENV"),
        ({"first_listener": {"ae_title": "FLAG"}}, "FLAG"),
    ),
    "http.port": (
        _http_port,
        8080,
        ("[http]\nport = 2001\n", 2001),
        ({"ECHO_SCP_HTTP__PORT": "2002"}, 2002),
        ({"overrides": {"http": {"port": 2003}}}, 2003),
    ),
    "log.level": (
        _log_level,
        "info",
        ('[log]\nlevel = "warning"\n', "warning"),
        ({"ECHO_SCP_LOG__LEVEL": "error"}, "error"),
        ({"overrides": {"log": {"level": "debug"}}}, "debug"),
    ),
}


@pytest.mark.parametrize("layers", ["default", "file", "env", "flag", "env without file", "flag without env"])
@pytest.mark.parametrize("field", sorted(LAYERS))
def test_precedence_per_field(field: str, layers: str, tmp_path: Path) -> None:
    """The value of a field comes from the highest layer that sets it: flag, environment, file, default."""
    read, default, (text, from_file), (environ, from_env), (flag, from_flag) = LAYERS[field]
    use_file = layers in ("file", "env", "flag", "flag without env")
    use_env = layers in ("env", "flag", "env without file")
    use_flag = layers in ("flag", "flag without env")
    settings = load_settings(
        write(tmp_path, text) if use_file else EMPTY,
        environ=environ if use_env else {},
        **(flag if use_flag else {}),
    )
    expected = from_flag if use_flag else from_env if use_env else from_file if use_file else default
    assert read(settings) == expected


def test_precedence_leaves_other_fields_alone(tmp_path: Path) -> None:
    """Overriding one field of a listener or table keeps the file's values of its other fields."""
    config = write(
        tmp_path,
        '[http]\nhost = "127.0.0.1"\nport = 2001\n[log]\nformat = "json"\n'
        '[[listeners]]\nname = "main"\nhost = "127.0.0.1"\nport = 1001\nmax_associations = 5\n',
    )
    settings = load_settings(
        config,
        environ={"ECHO_SCP_PORT": "1002", "ECHO_SCP_HTTP__PORT": "2002"},
        overrides={"log": {"level": "debug"}},
        first_listener={"ae_title": "FLAG"},
    )
    listener = settings.listeners[0]
    assert (listener.name, listener.host, listener.port, listener.ae_title) == (
        "main",
        "127.0.0.1",
        1002,
        "FLAG",
    )
    assert listener.max_associations == 5
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 2002)
    assert (settings.log.level, settings.log.format) == ("debug", "json")


def test_serve_flags_take_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve` flags, as check-config shows them, beat the environment and the file, in any table."""
    config = write(
        tmp_path,
        '[http]\nport = 2001\n[log]\nlevel = "info"\n[[listeners]]\nport = 1001\nae_title = "FILE"\n',
    )
    for name, value in {
        "ECHO_SCP_PORT": "1002",
        "ECHO_SCP_AE_TITLE": "ENV",
        "ECHO_SCP_HTTP__PORT": "2002",
        "ECHO_SCP_HTTP__HOST": "127.0.0.3",
    }.items():
        monkeypatch.setenv(name, value)
    status, effective, _err = check_config(
        capsys,
        *("--config", str(config), "-aet", "FLAG", "--http-port", "2003", "-ll", "warn", "-xi", "1003"),
        *("--http-host", "::1", "-ba", "127.0.0.2"),
    )
    assert status == 0
    listener = effective["listeners"][0]
    assert (listener["port"], listener["ae_title"], listener["transfer_syntaxes"]) == (
        1003,
        "FLAG",
        ["Implicit VR Little Endian"],
    )
    assert (effective["http"]["port"], effective["log"]["level"]) == (2003, "warning")
    assert (effective["http"]["host"], listener["host"]) == ("::1", "127.0.0.2"), "-ba moves only DICOM"


def test_check_config_shows_environment_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config prints the effective configuration: environment over file over defaults."""
    config = write(
        tmp_path,
        '[http]\nport = 2001\n[log]\nlevel = "warning"\n[[listeners]]\nport = 1001\nae_title = "FILE"\n',
    )
    monkeypatch.setenv("ECHO_SCP_PORT", "1002")
    monkeypatch.setenv("ECHO_SCP_LOG__LEVEL", "error")
    status, effective, err = check_config(capsys, "--config", str(config))
    assert (status, err) == (0, f"echo-scp: config file {config}\n")
    listener = effective["listeners"][0]
    assert (listener["port"], listener["ae_title"], listener["max_associations"]) == (1002, "FILE", 64)
    assert (effective["http"]["port"], effective["log"]["level"]) == (2001, "error")


# ---------------------------------------------------------------------------
# The environment's views of the model


def test_flat_listener_variables_apply_to_the_first_listener(tmp_path: Path) -> None:
    """ECHO_SCP_AE_TITLE and ECHO_SCP_PORT change the file's first listener and leave the second alone."""
    config = write(
        tmp_path,
        '[[listeners]]\nname = "main"\nport = 1001\nae_title = "FILE"\n'
        '[[listeners]]\nname = "second"\nport = 1002\nae_title = "SECOND"\n',
    )
    settings = load_settings(config, environ={"ECHO_SCP_AE_TITLE": "ENV", "ECHO_SCP_PORT": "2001"})
    summary = [(lst.name, lst.port, lst.ae_title) for lst in settings.listeners]
    assert summary == [("main", 2001, "ENV"), ("second", 1002, "SECOND")]


def test_flat_tls_variables_turn_on_tls(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    """ECHO_SCP_TLS__CERT_FILE and ECHO_SCP_TLS__KEY_FILE add TLS to the file's plain listener."""
    config = write(tmp_path, '[[listeners]]\nname = "main"\nport = 2762\n')
    environ = {
        "ECHO_SCP_TLS__CERT_FILE": str(tls_files["cert"]),
        "ECHO_SCP_TLS__KEY_FILE": str(tls_files["key"]),
    }
    listener = load_settings(config, environ=environ).listeners[0]
    assert (listener.name, listener.port) == ("main", 2762)
    assert listener.tls is not None
    assert (listener.tls.cert_file, listener.tls.key_file) == (tls_files["cert"], tls_files["key"])


@pytest.mark.parametrize("value", ["A,B", " A , B ,", '["A", "B"]'])
def test_allowed_calling_ae_titles_from_environment(value: str) -> None:
    """ECHO_SCP_ALLOWED_CALLING_AE_TITLES takes a comma-separated list or a JSON list."""
    settings = load_settings(EMPTY, environ={"ECHO_SCP_ALLOWED_CALLING_AE_TITLES": value})
    assert settings.listeners[0].allowed_calling_ae_titles == ["A", "B"]


def test_listeners_variable_replaces_the_files_list(tmp_path: Path) -> None:
    """ECHO_SCP_LISTENERS (JSON) replaces the file's listeners instead of merging into them."""
    config = write(tmp_path, '[[listeners]]\nname = "from-file"\nport = 1001\nae_title = "FILE"\n')
    environ = {"ECHO_SCP_LISTENERS": '[{"name": "a", "port": 2001}, {"name": "b", "port": 2002}]'}
    settings = load_settings(config, environ=environ)
    assert [(lst.name, lst.port, lst.ae_title) for lst in settings.listeners] == [
        ("a", 2001, "ECHOSCP"),
        ("b", 2002, "ECHOSCP"),
    ]


def test_config_variable_selects_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ECHO_SCP_CONFIG names the file when --config does not, and --config wins when both do."""
    chosen = write(tmp_path, "[[listeners]]\nport = 1001\n", "chosen.toml")
    other = write(tmp_path, "[[listeners]]\nport = 1002\n", "other.toml")
    monkeypatch.setenv("ECHO_SCP_CONFIG", str(chosen))
    status, effective, err = check_config(capsys)
    assert (status, effective["listeners"][0]["port"]) == (0, 1001)
    assert err == f"echo-scp: config file {chosen}\n"
    status, effective, err = check_config(capsys, "--config", str(other))
    assert (status, effective["listeners"][0]["port"]) == (0, 1002)
    assert err == f"echo-scp: config file {other}\n"


@pytest.mark.parametrize("named_by", ["--config", "ECHO_SCP_CONFIG"])
def test_missing_config_file_is_named(
    named_by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file named by --config or ECHO_SCP_CONFIG is an error naming the file and who named it."""
    missing = tmp_path / "nowhere.toml"
    if named_by == "--config":
        argv: tuple[str, ...] = ("--config", str(missing))
    else:
        argv = ()
        monkeypatch.setenv("ECHO_SCP_CONFIG", str(missing))
    status, effective, err = check_config(capsys, *argv)
    assert (status, effective) == (2, None)
    assert err == f"{HEADING}\n  {named_by}: config file '{missing}' does not exist\n"


def test_without_a_named_file_the_working_directory_default_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With neither --config nor ECHO_SCP_CONFIG, check-config reads and names ./config/echo-scp.toml."""
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "[[listeners]]\nport = 1001\n")
    status, effective, err = check_config(capsys)
    assert (status, effective["listeners"][0]["port"]) == (0, 1001)
    assert err == f"echo-scp: config file {tmp_path / 'config' / 'echo-scp.toml'}\n"


def test_without_any_file_check_config_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """With no file named and none at the default places, check-config says so and shows the defaults."""
    status, effective, err = check_config(capsys)
    assert (status, effective["listeners"][0]["port"], effective["http"]["port"]) == (0, 11112, 8080)
    assert err == (
        "echo-scp: no config file (none named, none at config/echo-scp.toml, /etc/echo-scp/echo-scp.toml): "
        "defaults and environment only\n"
    )


def test_load_settings_without_a_file_reads_none(tmp_path: Path) -> None:
    """load_settings(None) reads no file at all: looking for the default file is the command line's job."""
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "[[listeners]]\nport = 1001\n")
    assert load_settings(None, environ={}).listeners[0].port == 11112


# ---------------------------------------------------------------------------
# Types: the file's values are typed, the environment's are strings


def test_environment_strings_are_converted(tmp_path: Path) -> None:
    """ECHO_SCP_PORT=13201 is a port and "no" is false: variables are strings, read by the field's type."""
    environ = {
        "ECHO_SCP_PORT": "13201",
        "ECHO_SCP_REQUIRE_CALLED_AE_TITLE": "no",
        "ECHO_SCP_ACSE_TIMEOUT": "5",
        "ECHO_SCP_HTTP__ENABLED": "false",
    }
    settings = load_settings(EMPTY, environ=environ)
    listener = settings.listeners[0]
    assert (listener.port, listener.require_called_ae_title, listener.acse_timeout) == (13201, False, 5.0)
    assert settings.http.enabled is False


def test_file_integers_are_accepted_for_seconds(tmp_path: Path) -> None:
    """`acse_timeout = 30` (a TOML integer) is accepted where seconds are a float."""
    config = write(tmp_path, "shutdown_grace_period = 3\n[[listeners]]\nacse_timeout = 30\n")
    settings = load_settings(config, environ={})
    assert (settings.listeners[0].acse_timeout, settings.shutdown_grace_period) == (30.0, 3.0)


def test_python_values_are_typed_strictly() -> None:
    """Values handed to load_settings from Python are not coerced either: a string is not a port."""
    assert problems(EMPTY, first_listener={"port": "104"}) == [
        "listeners[0].port: Input should be a valid integer, not a string ('104')"
    ]


# ---------------------------------------------------------------------------
# Paths


def test_relative_tls_paths_resolve_against_the_config_files_folder(
    tmp_path: Path, tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cert_file = "tls/server.pem" means next to the config file, whatever the working directory."""
    folder = tmp_path / "etc"
    (folder / "tls").mkdir(parents=True)
    for name in ("cert", "key", "ca"):
        shutil.copy(tls_files[name], folder / "tls" / tls_files[name].name)
    write(
        folder,
        '[[listeners]]\n[listeners.tls]\ncert_file = "tls/server.pem"\nkey_file = "./tls/server.key"\n'
        'ca_file = "tls/../tls/ca.pem"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tls = load_settings(Path("..") / "etc" / "echo-scp.toml", environ={}).listeners[0].tls
    assert tls is not None
    assert [p.resolve() for p in (tls.cert_file, tls.key_file, tls.ca_file or Path())] == [
        (folder / "tls" / name).resolve() for name in ("server.pem", "server.key", "ca.pem")
    ]


def test_relative_paths_from_the_environment_resolve_against_the_working_directory(
    tmp_path: Path, tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECHO_SCP_TLS__CERT_FILE=server.pem is read from the working directory, not the config's folder."""
    config_folder = tmp_path / "etc"
    config_folder.mkdir()
    config = write(config_folder, "[[listeners]]\nport = 2762\n")
    monkeypatch.chdir(tls_files["cert"].parent)
    environ = {"ECHO_SCP_TLS__CERT_FILE": "server.pem", "ECHO_SCP_TLS__KEY_FILE": "server.key"}
    tls = load_settings(config, environ=environ).listeners[0].tls
    assert tls is not None and tls.cert_file.resolve() == tls_files["cert"].resolve()


# ---------------------------------------------------------------------------
# Field rules


@pytest.mark.parametrize(
    ("value", "uid"),
    [
        ("ExplicitVRLittleEndian", "1.2.840.10008.1.2.1"),
        ("explicitvrlittleendian", "1.2.840.10008.1.2.1"),
        ("Explicit VR Little Endian", "1.2.840.10008.1.2.1"),
        ("EXPLICIT VR BIG ENDIAN", "1.2.840.10008.1.2.2"),
        ("JPEGBaseline8Bit", "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.1.99"),
        ("1.2.826.0.1.3680043.9.9999.1", "1.2.826.0.1.3680043.9.9999.1"),
    ],
)
def test_transfer_syntax_resolves_to_uid(value: str, uid: str, tmp_path: Path) -> None:
    """A transfer syntax by keyword, DICOM name (any case) or UID, even a private one, becomes its UID."""
    config = write(tmp_path, f"[[listeners]]\ntransfer_syntaxes = [{json.dumps(value)}]\n")
    assert load_settings(config, environ={}).listeners[0].transfer_syntaxes == [uid]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ECHOSCP", "ECHOSCP"),
        ("  ECHOSCP  ", "ECHOSCP"),
        ("ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),
        ("  ABCDEFGHIJKLMNOP  ", "ABCDEFGHIJKLMNOP"),
        ("ECHO SCP", "ECHO SCP"),
    ],
)
def test_ae_title_is_stripped_and_may_have_16_characters(value: str, expected: str) -> None:
    """Leading and trailing spaces of an AE title are not significant, and 16 characters are allowed."""
    settings = load_settings(
        EMPTY, environ={}, first_listener={"ae_title": value, "allowed_calling_ae_titles": [value]}
    )
    assert settings.listeners[0].ae_title == expected
    assert settings.listeners[0].allowed_calling_ae_titles == [expected]


@pytest.mark.parametrize("value", ["WARN", "Warning", "warn"])
def test_log_level_accepts_warn_in_any_case(value: str) -> None:
    """The log level is case-insensitive and "warn" means "warning", as in echoscp's -ll."""
    assert load_settings(EMPTY, environ={"ECHO_SCP_LOG__LEVEL": value}).log.level == "warning"


def test_distinct_binds_on_one_port_are_accepted() -> None:
    """Listeners on the same port but different specific addresses, or on port 0, do not overlap."""
    settings = load_settings(
        EMPTY,
        environ={},
        overrides={
            "listeners": [
                {"name": "a", "host": "127.0.0.1", "port": 11112},
                {"name": "b", "host": "::1", "port": 11112},
                {"name": "c", "host": "0.0.0.0", "port": 0},
                {"name": "d", "host": "0.0.0.0", "port": 0},
            ]
        },
    )
    assert [lst.name for lst in settings.listeners] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("http", "listener"),
    [
        ({"host": "127.0.0.1", "port": 11112}, {"host": "::1", "port": 11112}),
        ({"host": "0.0.0.0", "port": 0}, {"host": "0.0.0.0", "port": 0}),
        ({"host": "0.0.0.0", "port": 8080}, {"host": "0.0.0.0", "port": 11112}),
        ({"enabled": False, "host": "0.0.0.0", "port": 11112}, {"host": "0.0.0.0", "port": 11112}),
    ],
    ids=["other-address", "port-0", "other-port", "http-off"],
)
def test_http_port_beside_a_dicom_port_is_accepted(http: dict[str, Any], listener: dict[str, Any]) -> None:
    """HTTP may share a port number with a listener on another address, on port 0, or when it is off."""
    settings = load_settings(None, environ={}, overrides={"http": http, "listeners": [listener]})
    assert (settings.http.port, settings.listeners[0].port) == (http["port"], listener["port"])


def test_readiness_max_age_may_equal_interval_plus_timeout() -> None:
    """max_age exactly interval + timeout is accepted: the latest success lands just in time."""
    readiness = {"interval": 4.0, "timeout": 1.5, "max_age": 5.5}
    assert load_settings(None, environ={}, overrides={"readiness": readiness}).readiness.max_age == 5.5


def test_unquoted_tls_min_version_is_read_as_text(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    """`min_version = 1.3` (a TOML float) means TLS 1.3 rather than an error saying '1.3' is expected."""
    config = write(tmp_path, tls_listener(tls_files["cert"], tls_files["key"], "min_version = 1.3\n"))
    tls = load_settings(config, environ={}).listeners[0].tls
    assert tls is not None and tls.min_version == "1.3"


def test_encrypted_key_loads_with_its_password(
    tmp_path: Path, tls_files: dict[str, Path], encrypted_key: Path
) -> None:
    """An encrypted key with the right key_password loads."""
    config = write(tmp_path, tls_listener(tls_files["cert"], encrypted_key, 'key_password = "secret"\n'))
    tls = load_settings(config, environ={}).listeners[0].tls
    assert tls is not None and tls.key_password is not None
    assert tls.key_password.get_secret_value() == "secret"


def test_encrypted_key_without_password_is_rejected(
    tmp_path: Path, tls_files: dict[str, Path], encrypted_key: Path
) -> None:
    """An encrypted key without key_password is a problem line, not an OpenSSL pass phrase prompt."""
    config = write(tmp_path, tls_listener(tls_files["cert"], encrypted_key))
    assert problems(config) == [
        f"listeners[0].tls: key_file is encrypted but key_password is not set (from {config})"
    ]


def test_encrypted_key_with_wrong_password_is_rejected(
    tmp_path: Path, tls_files: dict[str, Path], encrypted_key: Path
) -> None:
    """A key_password that does not decrypt the key is named as the problem."""
    config = write(tmp_path, tls_listener(tls_files["cert"], encrypted_key, 'key_password = "wrong"\n'))
    assert problems(config) == [f"listeners[0].tls: key_password does not decrypt key_file (from {config})"]


# ---------------------------------------------------------------------------
# The shipped file and check-config


def test_shipped_config_is_exactly_the_defaults() -> None:
    """config/echo-scp.toml loads to the model defaults, so the documented file cannot drift from the code."""
    assert load_settings(SHIPPED, environ={}).redacted() == load_settings(EMPTY, environ={}).redacted()


# Options the shipped file shows only in comments: unset by default (TOML has
# no null), or an array of tables that a `peers = []` line would stop a user
# from adding to.
COMMENTED_OUT = {
    "http": {"tls", "basic_auth_users_file"},
    "listeners": {"tls", "peers"},
}


def test_shipped_config_shows_every_key() -> None:
    """config/echo-scp.toml spells out every option except the commented-out ones, which it mentions."""
    text = SHIPPED.read_text()
    shipped = tomllib.loads(text)
    assert set(shipped) == set(Settings.model_fields)
    for table, model in (
        ("http", HttpSettings),
        ("log", LogSettings),
        ("readiness", ReadinessSettings),
        ("probe", ProbeSettings),
    ):
        assert set(shipped[table]) == set(model.model_fields) - COMMENTED_OUT.get(table, set()), table
    assert set(shipped["probe"]["modules"]["default"]) == set(ProbeModuleSettings.model_fields) - {"tls"}
    assert set(shipped["listeners"][0]) == set(ListenerSettings.model_fields) - COMMENTED_OUT["listeners"]
    commented = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for table, names in COMMENTED_OUT.items():
        for name in names:
            assert f"[{table}.{name}]" in commented or f"{name} =" in commented, f"{table}.{name}"


def test_shipped_config_documents_every_tls_key() -> None:
    """The commented-out TLS table of config/echo-scp.toml names every TLS key, with its default if any."""
    text = SHIPPED.read_text()
    block = text[text.index("# [listeners.tls]\n") :].splitlines()[1:]
    shown = {}
    for line in block:
        match = re.match(r"# (\w+) = ", line)
        if match:
            shown[match.group(1)] = tomllib.loads(line[2:].split("#")[0])[match.group(1)]
    assert set(shown) == set(TlsSettings.model_fields)
    for name, info in TlsSettings.model_fields.items():
        if not info.is_required() and info.default is not None:
            assert shown[name] == info.default, name


def test_check_config_prints_the_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config names the shipped file and prints its effective settings as JSON, syntaxes by name."""
    status, effective, err = check_config(capsys, "--config", str(SHIPPED))
    assert (status, err) == (0, f"echo-scp: config file {SHIPPED}\n")
    assert effective["listeners"][0]["transfer_syntaxes"] == [
        "Implicit VR Little Endian",
        "Explicit VR Little Endian",
        "Deflated Explicit VR Little Endian",
        "Explicit VR Big Endian",
    ]
    expected = load_settings(SHIPPED, environ={}).redacted()
    for listener in [*effective["listeners"], *expected["listeners"]]:
        del listener["transfer_syntaxes"]
    assert effective == expected


def test_check_config_output_loads_back_to_the_same_listeners(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The listeners check-config prints, given back as ECHO_SCP_LISTENERS, load to the same settings."""
    private = "1.2.826.0.1.3680043.9.9999.1"
    config = write(
        tmp_path,
        f'[[listeners]]\nport = 1001\ntransfer_syntaxes = ["JPEGBaseline8Bit", "{private}", '
        '"1.2.840.10008.1.2"]\n',
    )
    status, effective, _err = check_config(capsys, "--config", str(config))
    assert status == 0
    assert effective["listeners"][0]["transfer_syntaxes"] == [
        "JPEG Baseline (Process 1)",
        private,
        "Implicit VR Little Endian",
    ]
    again = load_settings(None, environ={"ECHO_SCP_LISTENERS": json.dumps(effective["listeners"])})
    assert again.listeners == load_settings(config, environ={}).listeners


def test_check_config_redacts_secrets(
    tmp_path: Path, tls_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config masks key_password (OpenSSL ignores a password for an unencrypted key, so it loads)."""
    config = write(tmp_path, tls_listener(tls_files["cert"], tls_files["key"], 'key_password = "hunter2"\n'))
    status = cli.main(["check-config", "--config", str(config)])
    out, err = capsys.readouterr()
    assert (status, err) == (0, f"echo-scp: config file {config}\n")
    assert "hunter2" not in out
    tls = json.loads(out)["listeners"][0]["tls"]
    assert tls["key_password"] == "**********"
    assert (tls["cert_file"], tls["key_file"]) == (str(tls_files["cert"]), str(tls_files["key"]))


def test_check_config_reports_problems_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 2 on an invalid file and lists each problem, indented, under one heading."""
    config = INVALID / "several_problems.toml"
    status, effective, err = check_config(capsys, "--config", str(config))
    assert (status, effective) == (2, None)
    lines = [f"  {line.replace('@FILE@', str(config))}" for line in EXPECTED["several_problems.toml"]]
    assert err.splitlines() == [HEADING, *lines]


def test_serve_with_invalid_config_exits_before_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`echo-scp serve` exits 2 on an invalid configuration without opening its DICOM or HTTP port."""
    dicom_port, http_port = free_port(), free_port()
    config = write(
        tmp_path,
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
        f'[[listeners]]\nhost = "127.0.0.1"\nport = {dicom_port}\nae_title = "ABCDEFGHIJKLMNOPQ"\n',
    )
    assert cli.main(["serve", "--config", str(config)]) == 2
    _out, err = capsys.readouterr()
    assert err.splitlines() == [
        HEADING,
        f"  listeners[0].ae_title: AE title must be at most 16 characters (got 17) (from {config})",
    ]
    for port in (dicom_port, http_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ---------------------------------------------------------------------------
# TLS material: loaded once by validation, reused by the listener and the self-check


def test_tls_files_are_loaded_once_per_load_of_the_settings(
    start_service: Callable[..., Any], tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation loads the certificates; serving and self-checks reuse them, and a reload loads them anew."""
    loaded: list[str] = []
    original = ssl.SSLContext.load_cert_chain

    def load_cert_chain(context: ssl.SSLContext, certfile: Any, *args: Any, **kwargs: Any) -> None:
        loaded.append(Path(certfile).name)
        original(context, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)
    tls = mutual_tls(tls_files)

    def settings() -> Settings:
        return make_settings(listeners=[{"tls": tls}])

    first = settings()
    assert loaded == ["server.pem", "client.pem"], "validation loads the server's and the self-check's files"
    running = start_service(first, reloader=settings)

    def successes() -> float:
        return float(running.sample("echo_scp_self_checks_total", listener="dicom", result="success"))

    wait_for(lambda: successes() >= 2, timeout=20)
    assert loaded == ["server.pem", "client.pem"], (
        "the listener and its self-checks reuse the loaded contexts"
    )
    assert running.service.reload().complete
    done = successes()
    wait_for(lambda: successes() >= done + 2, timeout=20)
    assert loaded == ["server.pem", "client.pem"] * 2, "a reload loads the files once more, and only once"
