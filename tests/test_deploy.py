"""Deployment artefacts against the daemon they deploy.

The Dockerfile, docker-compose.yml, the Prometheus config, alert rules and
their unit tests, the Grafana dashboard and the Kubernetes manifests are
checked with the real tools (hadolint, check-jsonschema's Compose
Specification schema, promtool, kubectl kustomize, kubernetes-validate) and
against the daemon itself: probe paths, ports, grace periods and config files
come from ``echo_scp``, metric names from a running daemon's /metrics, and the
image's install, ENTRYPOINT, CMD and HEALTHCHECK are replayed in a fresh venv.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from echo_scp import __version__
from echo_scp.health import LIVENESS_PATHS, METRICS_PATH, READINESS_PATHS
from echo_scp.settings import ConfigError, HttpSettings, ListenerSettings, Settings, load_settings
from tests.conftest import REPO, free_port, http_get, require_tool, venv_tool, wait_for

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
# The secured variant: docker compose -f docker-compose.yml -f deploy/compose/secured.yml
SECURED_COMPOSE = REPO / "deploy" / "compose" / "secured.yml"
CONFIG = REPO / "config" / "echo-scp.toml"
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "echo-scp.rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "rules" / "echo-scp.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SECURED_PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.secured.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "echo-scp.json"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ("base", "overlays/production", "overlays/exec-probe")
PRODUCTION = "overlays/production"
EXAMPLE_TLS_SECRET = K8S / PRODUCTION / "tls-secret.example.yaml"
# Every Secret the production overlay mounts or references, as a placeholder example.
EXAMPLE_SECRETS = sorted((K8S / PRODUCTION).glob("*secret.example.yaml"))
PROMETHEUS_RULE = K8S / "components" / "servicemonitor" / "prometheusrule.yaml"
# The image's paths, as the Dockerfile and the manifests use them.
IMAGE_CONFIG = "/etc/echo-scp/echo-scp.toml"
IMAGE_VENV = "/opt/venv"
IMAGE_UID = 10001
# The builder stage's recipe for the venv, which `make bench` runs too.
RUNTIME_VENV_SCRIPT = "deploy/runtime-venv.sh"
# The scrape job name the alert rules select.
JOB = "echo-scp"
# Custom resources that kubernetes-validate has no schema for; checked by hand.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Oldest Kubernetes minor the manifests support, and the newest known schema.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# After the grace period the daemon aborts what is left (at most 2 s) and closes
# down (well under a second): what a stop timeout must add to the grace period.
# test_default_shutdown_fits_the_engines_stop_timeout measures it.
SHUTDOWN_OVERHEAD = 3.0
# docker stop's and podman stop's timeout unless told otherwise (then SIGKILL).
ENGINE_STOP_TIMEOUT = 10.0
# The single registry placeholder every kustomization renders.
IMAGE_PLACEHOLDER = "registry.example.com/echo-scp"
# Labels that Prometheus or the scrape config attach, not the daemon.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "echo_traffic_expected"}
METRIC_NAME = re.compile(r"\b((?:echo_scp|process)_[a-zA-Z0-9_]+)\b")
SELECTOR = re.compile(r"\b((?:echo_scp|process)_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


# -- readers ------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def instruction(keyword: str, *, stage: str = "final") -> list[str]:
    """Arguments of every ``keyword`` in the final stage ("final") or the whole file ("all")."""
    found: list[str] = []
    for kw, args in dockerfile():
        if kw == "FROM" and stage == "final":
            found = []
        if kw == keyword:
            found.append(args)
    return found


def exec_form(keyword: str) -> list[str]:
    """The JSON array of the last ENTRYPOINT/CMD; shell form is a failure."""
    args = instruction(keyword)[-1]
    value = json.loads(args)
    assert isinstance(value, list), f"{keyword} must use the exec (JSON) form"
    return value


def healthcheck() -> list[str]:
    (args,) = instruction("HEALTHCHECK", stage="all")
    _options, _, command = args.partition("CMD ")
    value = json.loads(command)
    assert isinstance(value, list), "HEALTHCHECK CMD must use the exec (JSON) form"
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def seconds(duration: str) -> float:
    """A Compose duration such as "1m30s" or "25s" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_environment(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return only(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (main,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "echo-scp"]
    return main


def container_ports(objects: tuple[dict[str, Any], ...]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(objects)["ports"]}


def config_text(objects: tuple[dict[str, Any], ...]) -> str:
    """The echo-scp.toml the pod mounts, after checking the mount matches the CMD's --config."""
    spec = pod_spec(objects)
    args = container(objects).get("args") or exec_form("CMD")
    config_path = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    configmap = only(objects, "ConfigMap", volume["configMap"]["name"])
    return str(configmap["data"][config_path.name])


def secret_mounts(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """mountPath -> Secret name for the container's Secret volumes."""
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in container(objects)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }


def container_environ(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects).get("env", [])}


def stand_ins(tls_files: dict[str, Path], tmp: Path) -> dict[str, Path]:
    """Test files for the file names the Secrets provide: certificates and a basic auth users file."""
    import bcrypt

    users = tmp / "users"
    if not users.exists():
        users.write_text(f"prometheus:{bcrypt.hashpw(b'test', bcrypt.gensalt(rounds=4)).decode()}\n")
    return {
        "tls.crt": tls_files["cert"],
        "tls.key": tls_files["key"],
        "ca.crt": tls_files["ca"],
        "users": users,
    }


def load_with_test_tls(text: str, tls_files: dict[str, Path], tmp: Path, environ: dict[str, str]) -> Settings:
    """Load a config whose TLS and users files live in Secrets, with test files in their place."""
    files = stand_ins(tls_files, tmp)

    def swap(match: re.Match[str]) -> str:
        return f'"{files[Path(match.group(1)).name]}"'

    path = tmp / "echo-scp.toml"
    path.write_text(re.sub(r'"(/[^"]*/(?:tls\.crt|tls\.key|ca\.crt|users))"', swap, text))
    return load_settings(path, environ=environ)


def secret_paths(text: str) -> list[str]:
    """Every file a config reads from a Secret: listener and HTTP TLS files, the basic auth users file."""
    data = tomllib.loads(text)
    paths = []
    for listener in data.get("listeners", []):
        tls = listener.get("tls") or {}
        paths += [str(v) for k, v in tls.items() if k.endswith("_file")]
    http = data.get("http", {})
    paths += [str(v) for k, v in (http.get("tls") or {}).items() if k.endswith("_file")]
    if "basic_auth_users_file" in http:
        paths.append(str(http["basic_auth_users_file"]))
    return paths


def example_secrets() -> dict[str, dict[str, Any]]:
    """The placeholder Secrets of the production overlay, by name."""
    examples = [yaml.safe_load(path.read_text()) for path in EXAMPLE_SECRETS]
    return {example["metadata"]["name"]: example for example in examples}


def probes(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    main = container(objects)
    return {kind: main[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in main}


def expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard query."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


# -- Dockerfile ---------------------------------------------------------------


def test_hadolint_passes():
    """hadolint finds nothing in the Dockerfile, and every rule it is told to ignore says why."""
    hadolint = venv_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert instruction("USER", stage="all") == instruction("USER"), "no USER before the final stage"
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            reason = line.split("hadolint ignore=", 1)[1].split(maxsplit=1)[1:]
            assert reason and len(reason[0]) > 10, f"an ignored hadolint rule needs a reason: {line}"


def test_dockerfile_matches_daemon():
    """The image runs the console script as UID 10001 with the default config, exposes the daemon's ports."""
    # "FROM scratch AS wheelhouse" is the empty stand-in for a --build-context.
    stages = [s for s in instruction("FROM", stage="all") if s.split()[0] != "scratch"]
    args = dict(a.split("=", 1) for a in instruction("ARG", stage="all") if "=" in a)
    bases = [s.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for s in stages]
    assert len(bases) == 2 and bases[0] == bases[1], "builder and final stage must share one base"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]
    assert args["VERSION"] == __version__, "bump the Dockerfile's VERSION with echo_scp.__version__"

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form("ENTRYPOINT") == ["echo-scp"] and "echo-scp" in scripts
    cmd = exec_form("CMD")
    assert cmd[0] == "serve" and cmd[cmd.index("--config") + 1] == IMAGE_CONFIG
    assert f"config/echo-scp.toml {IMAGE_CONFIG}" in instruction("COPY")
    assert instruction("USER") == [str(IMAGE_UID)], "USER must be numeric for runAsNonRoot"

    production = tomllib.loads((K8S / PRODUCTION / "echo-scp.toml").read_text())
    tls_ports = {lst["port"] for lst in production["listeners"] if "tls" in lst}
    exposed = {int(p) for args in instruction("EXPOSE") for p in args.split()}
    defaults = {ListenerSettings.model_fields["port"].default, HttpSettings.model_fields["port"].default}
    assert exposed == defaults | tls_ports

    env = dockerfile_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == f"{IMAGE_VENV}/bin"
    labels = " ".join(instruction("LABEL"))
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_lets_the_build_inputs_through():
    """The allow-list .dockerignore keeps every file the builder stage needs in the context."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "expected an allow-list (starting with *)"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "service", "config/echo-scp.toml", RUNTIME_VENV_SCRIPT} <= allowed


# -- docker compose -----------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec():
    """docker-compose.yml is valid under the Compose Specification JSON schema (offline, vendored)."""
    checker = venv_tool("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_match_daemon():
    """Ports, stop grace period, healthcheck and mounts in docker-compose.yml agree with the daemon."""
    data = compose()
    services = data["services"]
    assert {"echo-scp", "prometheus"} <= set(services)
    assert services["grafana"]["profiles"] == ["grafana"]
    grace = load_settings(CONFIG, environ={}).shutdown_grace_period
    dicom = ListenerSettings.model_fields["port"].default
    http = HttpSettings.model_fields["port"].default
    expected_health = ["CMD", *healthcheck()]
    for name in ("echo-scp", "echo-scp-tls"):
        service = services[name]
        env = compose_environment(name)
        assert seconds(service["stop_grace_period"]) >= grace + SHUTDOWN_OVERHEAD
        assert service["healthcheck"]["test"] == expected_health, "keep in step with the Dockerfile"
        published = {str(p).rsplit(":", 1)[-1] for p in service["ports"]}
        assert {env.get("ECHO_SCP_PORT", str(dicom)), env.get("ECHO_SCP_HTTP__PORT", str(http))} <= published
    assert {"11112", "8080"} <= {str(p).rsplit(":", 1)[-1] for p in services["echo-scp"]["ports"]}

    for service in services.values():
        image = service.get("image", "")
        assert service.get("build") or re.search(r":v?\d+\.\d+\.\d+$", image), f"pin {image!r} to a version"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (REPO / source).exists(), f"{source} is mounted but missing"
    # Secrets are user-created files under deploy/compose/tls, used only behind a profile.
    for secret in data["secrets"].values():
        assert Path(secret["file"]).parent == Path("./deploy/compose/tls")
    for name, service in services.items():
        if service.get("secrets"):
            assert service.get("profiles"), f"{name} needs files users create: keep it behind a profile"
            for item in service["secrets"]:
                assert item["source"] in data["secrets"]


def secured_compose() -> dict[str, Any]:
    return yaml.safe_load(SECURED_COMPOSE.read_text())


def test_secured_compose_override_validates_and_uses_user_created_secrets():
    """deploy/compose/secured.yml is valid Compose, reads only git-ignored files, and mounts what it names."""
    checker = venv_tool("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(SECURED_COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = secured_compose()
    assert set(data["services"]) <= set(compose()["services"]), "an override, not new services"
    folder = Path("./deploy/compose/http")
    ignored = (REPO / folder / ".gitignore").read_text().split()
    assert ignored[-2:] == ["*", "!.gitignore"], "the credentials must never be committed"
    for secret in data["secrets"].values():
        assert Path(secret["file"]).parent == folder
    targets = {
        name: {item["target"]: item["source"] for item in service.get("secrets", [])}
        for name, service in data["services"].items()
    }
    env = data["services"]["echo-scp"]["environment"]
    users = env["ECHO_SCP_HTTP__BASIC_AUTH_USERS_FILE"]
    assert users.startswith("/run/secrets/") and Path(users).name in targets["echo-scp"]
    (volume,) = data["services"]["prometheus"]["volumes"]
    source, target = volume.split(":")[:2]
    assert (REPO / source).resolve() == SECURED_PROMETHEUS_CONFIG.resolve()
    assert target in {v.split(":")[1] for v in compose()["services"]["prometheus"]["volumes"]}, "replaces it"
    (job,) = [
        j
        for j in yaml.safe_load(SECURED_PROMETHEUS_CONFIG.read_text())["scrape_configs"]
        if j["job_name"] == JOB
    ]
    password = Path(job["basic_auth"]["password_file"])
    assert password.parent == Path("/run/secrets") and password.name in targets["prometheus"]


def test_secured_compose_environment_is_a_valid_configuration(tmp_path):
    """echo-scp's environment with the secured override loads with basic authentication on."""
    import bcrypt

    env = {**compose_environment("echo-scp"), **secured_compose()["services"]["echo-scp"]["environment"]}
    users = tmp_path / "users"
    users.write_text(f"prometheus:{bcrypt.hashpw(b'x', bcrypt.gensalt(rounds=4)).decode()}\n")
    env["ECHO_SCP_HTTP__BASIC_AUTH_USERS_FILE"] = str(users)
    settings = load_settings(CONFIG, environ=env)
    assert list(settings.http.users()) == ["prometheus"]
    assert not settings.http.protect_health_paths, "the compose healthcheck asks /livez without credentials"


def test_compose_environment_is_a_valid_configuration(tls_files, tmp_path):
    """Each service's ECHO_SCP_* variables, over the image's config file, give the intended settings."""
    plain = load_settings(CONFIG, environ=compose_environment("echo-scp"))
    assert plain.log.format == "json"
    assert plain.listeners[0].tls is None
    assert plain.listeners[0].port == int(compose_environment("echo-scp")["ECHO_SCP_PORT"])

    env = compose_environment("echo-scp-tls")
    targets = {s["target"]: s["source"] for s in compose()["services"]["echo-scp-tls"]["secrets"]}
    stand_ins = {"tls.crt": tls_files["cert"], "tls.key": tls_files["key"], "ca.crt": tls_files["ca"]}
    for key, value in env.items():
        if value.startswith("/run/secrets/"):
            assert Path(value).name in targets, f"{key} names a file no secret provides"
            env[key] = str(stand_ins[Path(value).name])
    tls = load_settings(CONFIG, environ=env)
    assert len(tls.listeners) == 1 and tls.listeners[0].tls is not None
    assert tls.listeners[0].port == 2762


# -- Prometheus ---------------------------------------------------------------


def test_prometheus_config_is_valid():
    """promtool accepts prometheus.yml, which scrapes the daemon's HTTP port and loads only the rules."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded = {p.name for pattern in config["rule_files"] for p in PROMETHEUS_CONFIG.parent.glob(pattern)}
    # dicom-probe.rules.yml: the /probe alerts, checked in tests/test_probe_deploy.py.
    assert loaded == {RULES.name, "dicom-probe.rules.yml"}, "the unit test files must not be loaded as rules"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    for static in job["static_configs"]:
        assert static["labels"]["echo_traffic_expected"] in {"true", "false"}
        for target in static["targets"]:
            host, port = target.rsplit(":", 1)
            assert host in compose()["services"] and int(port) == HttpSettings.model_fields["port"].default


def test_secured_prometheus_config_differs_only_in_authentication():
    """promtool accepts prometheus.secured.yml: prometheus.yml with basic auth where it scrapes echo-scp."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(SECURED_PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    plain = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    secured = yaml.safe_load(SECURED_PROMETHEUS_CONFIG.read_text())
    http_port = HttpSettings.model_fields["port"].default
    credentials = []
    for job in secured["scrape_configs"]:
        # Every job whose requests go to echo-scp's HTTP port: /metrics and /probe.
        addresses = [t for s in job["static_configs"] for t in s["targets"]] + [
            r["replacement"] for r in job.get("relabel_configs", []) if r.get("target_label") == "__address__"
        ]
        if any(a.startswith("echo-scp:") and a.endswith(f":{http_port}") for a in addresses):
            auth = job.pop("basic_auth")
            assert set(auth) == {"username", "password_file"}, "a password file, never a password"
            credentials.append(auth)
    assert len(credentials) >= 2 and all(auth == credentials[0] for auth in credentials)
    assert secured == plain


@pytest.mark.parametrize("name", ["echo-scp", "dicom-probe"])
def test_alert_rules_pass_promtool(name: str):
    """promtool checks each rule file and runs its unit tests."""
    promtool = require_tool("promtool")
    rules = DEPLOY / "prometheus" / "rules" / f"{name}.rules.yml"
    tests = rules.with_name(f"{name}.rules.test.yml")
    for command in (["check", "rules", str(rules)], ["test", "rules", str(tests)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_firing_and_silent_unit_tests():
    """The promtool unit tests contain, for every alert, a case where it fires and one where it must not."""
    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    assert alerts == {
        "EchoScpListenerDown",
        "EchoScpNotReady",
        "EchoScpHighRejectionRatio",
        "EchoScpTlsHandshakeFailuresRising",
        "EchoScpNoEchoTraffic",
        "EchoScpCertificateExpiresSoon",
        "EchoScpCertificateExpired",
        "EchoScpCertificateReloadFailed",
        "EchoScpHttpCertificateExpiresSoon",
        "EchoScpHttpCertificateReloadFailed",
    }
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == alerts and silent == alerts


def test_prometheusrule_is_a_copy_of_the_rules_file():
    """The Operator's PrometheusRule carries exactly the groups that promtool tested."""
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_rules_and_dashboard_use_exported_metrics(start_service, tls_files):
    """Every echo_scp_*/process_* name and label value in rules and dashboard is one the daemon exports."""
    # TLS on a listener and on the HTTP endpoint: their TLS series exist only with TLS.
    tls = {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}
    running = start_service(listeners=[{}, {"name": "secure", "tls": tls}], http={"tls": tls})
    running.wait_ready()
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    url = f"https://127.0.0.1:{running.http_port}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        assert response.status == 200
        body = response.read().decode()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body):
        samples.setdefault(family.name, [])
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)

    problems = []
    seen = set()
    for where, expr in expressions():
        for name in METRIC_NAME.findall(expr):
            seen.add(name)
            if name not in samples:
                problems.append(f"{where}: {name} is not exported")
        for name, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if op != "=" or label in TARGET_LABELS or name not in samples:
                    continue
                values = {labels.get(label) for labels in samples[name]}
                if value not in values:
                    problems.append(f"{where}: {name}{{{label}={value!r}}} matches no series (has {values})")
    assert not problems, "\n".join(problems)
    # Guard against a regex that silently matches nothing.
    assert {
        "echo_scp_listener_up",
        "echo_scp_echo_duration_seconds_bucket",
        "process_resident_memory_bytes",
    } <= seen


# -- Grafana ------------------------------------------------------------------


def check_dashboard_layout(panels: list[dict[str, Any]]) -> None:
    """Unique panel ids, no panel off the 24-column grid or over another, every query via ${datasource}."""
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"


def test_grafana_dashboard_and_provisioning_are_consistent():
    """The dashboard has unique panel ids, queries through its data source variable, and is provisioned."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    check_dashboard_layout(panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "listener",
        "ready",
        "outcome",
        "rejection",
        "active",
        "c-echo",
        "latency",
        "tls",
        "certificate",
        "cpu",
        "memory",
    ):
        assert topic in titles, f"no panel about {topic}"

    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/echo-scp.yml").read_text())
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


# -- Kubernetes ---------------------------------------------------------------


def check_custom_resource(obj: dict[str, Any]) -> None:
    """Hand-written structure checks for the Prometheus Operator kinds."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) <= {
            "jobLabel",
            "selector",
            "endpoints",
            "namespaceSelector",
            "targetLabels",
            "podTargetLabels",
        }
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "relabelings",
                "metricRelabelings",
                "scheme",
                "tlsConfig",
                "basicAuth",
            }
            assert endpoint.get("scheme", "http") in {"http", "https"}
            if "tlsConfig" in endpoint:
                assert set(endpoint["tlsConfig"]) <= {"ca", "serverName", "cert", "keySecret"}
                assert set(endpoint["tlsConfig"]["ca"]["secret"]) == {"name", "key"}
            if "basicAuth" in endpoint:
                assert set(endpoint["basicAuth"]) == {"username", "password"}
                for ref in endpoint["basicAuth"].values():
                    assert set(ref) == {"name", "key"}
            assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])
            for relabeling in endpoint.get("relabelings", []):
                assert set(relabeling) <= {"action", "sourceLabels", "targetLabel", "regex", "replacement"}
                assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", relabeling["targetLabel"])
    else:
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_valid_objects(kustomization):
    """kubectl kustomize renders it, and every object passes kubernetes-validate strictly (CRDs by hand)."""
    import kubernetes_validate

    objects = render(kustomization)
    assert container(objects)["image"] == f"{IMAGE_PLACEHOLDER}:{__version__}", (
        "one registry placeholder (set in base/kustomization.yaml), tagged with echo_scp.__version__"
    )
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert "NetworkPolicy" in kinds
    problems = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            check_custom_resource(obj)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.absolute_path)
                problems.append(
                    f"{obj['kind']}/{obj['metadata']['name']} ({version}) at {path}: {exc.message}"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pod_runs_locked_down(kustomization):
    """Non-root UID 10001, read-only root, no privilege escalation or capabilities, RuntimeDefault seccomp."""
    objects = render(kustomization)
    spec = pod_spec(objects)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_UID
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    # Kubernetes would inject ECHO_SCP_PORT=tcp://... for a Service named echo-scp.
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    security = container(objects)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
    resources = container(objects)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


def test_service_links_are_not_mistaken_for_settings():
    """Kubernetes service-link variables for a Service named echo-scp are ignored, not read as settings."""
    injected = {
        "ECHO_SCP_SERVICE_HOST": "10.96.0.10",
        "ECHO_SCP_SERVICE_PORT": "11112",
        "ECHO_SCP_SERVICE_PORT_DICOM": "11112",
        "ECHO_SCP_PORT": "tcp://10.96.0.10:11112",
        "ECHO_SCP_PORT_11112_TCP": "tcp://10.96.0.10:11112",
        "ECHO_SCP_PORT_11112_TCP_PROTO": "tcp",
        "ECHO_SCP_PORT_11112_TCP_PORT": "11112",
        "ECHO_SCP_PORT_11112_TCP_ADDR": "10.96.0.10",
        "ECHO_SCP_METRICS_PORT": "tcp://10.96.0.11:8080",
    }
    plain = load_settings(CONFIG, environ={})
    assert load_settings(CONFIG, environ=injected).redacted() == plain.redacted()
    # A real port setting is still honoured, and a malformed one still refused.
    assert load_settings(CONFIG, environ={"ECHO_SCP_PORT": "104"}).listeners[0].port == 104
    with pytest.raises(ConfigError):
        load_settings(CONFIG, environ={"ECHO_SCP_PORT": "tcp:/broken"})


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_use_the_daemons_paths_and_ports(kustomization, tls_files, tmp_path):
    """httpGet probes use LIVENESS_PATHS/READINESS_PATHS on the HTTP port; exec probes echo a listener."""
    objects = render(kustomization)
    ports = container_ports(objects)
    settings = load_with_test_tls(config_text(objects), tls_files, tmp_path, container_environ(objects))
    found = probes(objects)
    assert set(found) == {"startupProbe", "livenessProbe", "readinessProbe"}
    allowed = {
        "startupProbe": LIVENESS_PATHS,
        "livenessProbe": LIVENESS_PATHS,
        "readinessProbe": READINESS_PATHS,
    }
    for kind, probe in found.items():
        handlers = {"httpGet", "exec", "tcpSocket", "grpc"} & set(probe)
        assert len(handlers) == 1, f"{kind} must have exactly one handler, has {handlers}"
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] in allowed[kind], f"{kind} path"
            port = probe["httpGet"]["port"]
            assert (ports[port] if isinstance(port, str) else port) == settings.http.port
            scheme = "HTTPS" if settings.http.tls is not None else "HTTP"
            assert probe["httpGet"].get("scheme", "HTTP") == scheme, f"{kind} scheme"
            assert not settings.http.protect_health_paths, "httpGet probes cannot send credentials"
            if settings.http.tls is not None:
                assert settings.http.tls.client_auth_type != "RequireAndVerifyClientCert", "nor certificates"
        else:
            assert kind == "readinessProbe" and "exec" in probe
            command = probe["exec"]["command"]
            assert command[:2] == ["echo-scp", "echo"]
            called, _, hostport = command[2].partition("@")
            host, _, port = hostport.rpartition(":")
            assert host == "127.0.0.1"
            assert any(
                lst.port == int(port) and lst.ae_title == called and lst.tls is None
                for lst in settings.listeners
            ), f"{command[2]} is not a plain listener of the mounted config"
            assert probe["timeoutSeconds"] >= 3, "an exec probe starts a Python process: allow for it"
    assert settings.http.port == HttpSettings.model_fields["port"].default == ports["http"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ports_services_and_policies_match_the_config(kustomization, tls_files, tmp_path):
    """Every configured listener has a container port, a Service port and a NetworkPolicy opening."""
    objects = render(kustomization)
    settings = load_with_test_tls(config_text(objects), tls_files, tmp_path, container_environ(objects))
    ports = container_ports(objects)
    assert ports["dicom"] == ListenerSettings.model_fields["port"].default == settings.listeners[0].port
    assert ports["http"] == HttpSettings.model_fields["port"].default == settings.http.port
    listener_ports = {lst.port for lst in settings.listeners}
    assert set(ports.values()) == listener_ports | {settings.http.port}
    if any(lst.tls for lst in settings.listeners):
        assert ports["dicom-tls"] in {lst.port for lst in settings.listeners if lst.tls}

    dicom_service = only(objects, "Service", "echo-scp")
    assert {ports[p["targetPort"]] for p in dicom_service["spec"]["ports"]} == listener_ports
    assert {p["port"] for p in dicom_service["spec"]["ports"]} == listener_ports
    metrics_service = only(objects, "Service", "echo-scp-metrics")
    assert [ports[p["targetPort"]] for p in metrics_service["spec"]["ports"]] == [settings.http.port]

    policy = only(objects, "NetworkPolicy")["spec"]
    open_to_all = {p["port"] for rule in policy["ingress"] if not rule.get("from") for p in rule["ports"]}
    assert listener_ports <= open_to_all
    assert settings.http.port not in open_to_all, "health and metrics stay closed to the world"
    (monitoring,) = [rule for rule in policy["ingress"] if rule.get("from")]
    assert [p["port"] for p in monitoring["ports"]] == [settings.http.port]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_selectors_pick_the_pods(kustomization):
    """Deployment, Services, PDB, NetworkPolicy and HPA select (or target) the echo-scp pods, not all pods."""
    objects = render(kustomization)
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": only(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for service in (o for o in objects if o["kind"] == "Service"):
        selectors[f"Service {service['metadata']['name']}"] = service["spec"]["selector"]
    for owner, selector in selectors.items():
        assert selector, f"{owner} has an empty selector"
        assert selector.items() <= pod_labels.items(), f"{owner} does not select the pods"
    target = only(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_termination_grace_outlasts_the_shutdown(kustomization, tls_files, tmp_path):
    """The kubelet waits longer than preStop + shutdown_grace_period + the daemon's own abort time."""
    objects = render(kustomization)
    settings = load_with_test_tls(config_text(objects), tls_files, tmp_path, container_environ(objects))
    pre_stop = container(objects).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    needed = pause + settings.shutdown_grace_period + SHUTDOWN_OVERHEAD
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > needed


@pytest.mark.slow
def test_default_shutdown_fits_the_engines_stop_timeout(start_service):
    """With the default grace period, a peer that ignores our A-ABORT still lets stop() end inside 10 s."""
    from tests.test_engine import RawPeer

    grace = load_settings(CONFIG, environ={}).shutdown_grace_period
    assert grace + SHUTDOWN_OVERHEAD <= ENGINE_STOP_TIMEOUT - 1.0, "leave a second of slack under SIGKILL"
    running = start_service(shutdown_grace_period=grace)
    running.wait_ready()
    peer = RawPeer(running.port())
    try:
        peer.establish()
        wait_for(lambda: running.service.listeners[0].open_associations())
        started = time.monotonic()
        running.service.stop()
        elapsed = time.monotonic() - started
    finally:
        peer.close()
    # It drained for the whole grace period, then the abort step was bounded.
    assert grace <= elapsed <= grace + SHUTDOWN_OVERHEAD, f"stop took {elapsed:.2f} s"
    assert running.events("shutdown_complete")[-1]["aborted"] == 1


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_configmap_is_a_valid_config_with_its_secrets_mounted(kustomization, tls_files, tmp_path):
    """The mounted config loads (test certificates standing in for the Secret); its TLS files are mounted."""
    objects = render(kustomization)
    text = config_text(objects)
    settings = load_with_test_tls(text, tls_files, tmp_path, container_environ(objects))
    assert settings.log.format == "json"
    mounts = secret_mounts(objects)
    examples = example_secrets()
    for path in secret_paths(text):
        directory, name = str(Path(path).parent), Path(path).name
        assert directory in mounts, f"{path} is not on a mounted Secret"
        assert mounts[directory] in examples, f"no example for the Secret {mounts[directory]}"
        assert name in examples[mounts[directory]]["stringData"], f"the Secret example lacks {name}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secrets_are_mounted_as_folders_so_renewals_arrive(kustomization):
    """No Secret is mounted with subPath: such a mount never sees an update, so a renewal would not arrive."""
    objects = render(kustomization)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    for mount in container(objects)["volumeMounts"]:
        if "secret" in volumes[mount["name"]]:
            assert "subPath" not in mount and "subPathExpr" not in mount, mount


def test_example_secrets_are_valid_but_never_rendered():
    """The placeholder Secrets are valid, and kustomize leaves them out so they cannot overwrite real ones."""
    import kubernetes_validate

    assert EXAMPLE_TLS_SECRET in EXAMPLE_SECRETS and len(EXAMPLE_SECRETS) == 4
    for example in example_secrets().values():
        kubernetes_validate.validate(example, K8S_VERSIONS[-1], strict=True)
        assert all("PLACEHOLDER" in value for value in example["stringData"].values())
    for kustomization in KUSTOMIZATIONS:
        assert not [o for o in render(kustomization) if o["kind"] == "Secret"]


def test_config_copies_differ_only_deliberately():
    """base/echo-scp.toml equals config/echo-scp.toml; production adds a TLS listener and secures HTTP."""
    original = tomllib.loads(CONFIG.read_text())
    base = tomllib.loads((K8S / "base" / "echo-scp.toml").read_text())
    assert base == original
    production = tomllib.loads((K8S / PRODUCTION / "echo-scp.toml").read_text())
    extra = production["listeners"][len(original["listeners"]) :]
    production["listeners"] = production["listeners"][: len(original["listeners"])]
    secured = {key: production["http"].pop(key) for key in ("tls", "basic_auth_users_file")}
    assert production == original
    assert [lst["name"] for lst in extra] == ["dicom-tls"] and all("tls" in lst for lst in extra)
    assert secured["tls"]["cert_file"] and secured["basic_auth_users_file"]


def test_config_copies_show_the_self_check_keys():
    """Every config copy shows, commented out, the self-check certificate keys that mutual TLS may need."""
    for path in (CONFIG, K8S / "base" / "echo-scp.toml", K8S / PRODUCTION / "echo-scp.toml"):
        lines = path.read_text().splitlines()
        for key in ("self_check_cert_file", "self_check_key_file"):
            assert any(line.startswith(f"# {key} = ") for line in lines), f"{path}: {key}"


def test_servicemonitor_scrapes_the_metrics_service():
    """The ServiceMonitor selects the metrics Service, its port and path, and yields job="echo-scp"."""
    objects = render(PRODUCTION)
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service", "echo-scp-metrics")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["spec"]["jobLabel"]] == JOB
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items()
        <= only(objects, "Service", "echo-scp")["metadata"]["labels"].items()
    ), "the peer-facing Service must not be scraped as well"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == METRICS_PATH
    # echo_traffic_expected comes from the Service label production sets.
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "echo_traffic_expected"]
    (source,) = relabel["sourceLabels"]
    key = source.removeprefix("__meta_kubernetes_service_label_")
    assert {k.replace("-", "_").replace(".", "_").replace("/", "_"): v for k, v in labels.items()}[
        key
    ] == "true"
    rule = only(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_servicemonitor_authenticates_as_the_endpoint_requires(tls_files, tmp_path):
    """Production's endpoint wants TLS and basic auth: the ServiceMonitor scrapes so, with credentials."""
    objects = render(PRODUCTION)
    settings = load_with_test_tls(config_text(objects), tls_files, tmp_path, container_environ(objects))
    assert settings.http.tls is not None and settings.http.users(), "production secures HTTP"
    (endpoint,) = only(objects, "ServiceMonitor")["spec"]["endpoints"]
    examples = example_secrets()
    assert endpoint["scheme"] == "https"
    ca = endpoint["tlsConfig"]["ca"]["secret"]
    assert ca["key"] in examples[ca["name"]]["stringData"]
    service = only(objects, "Service", "echo-scp-metrics")
    namespace = service["metadata"]["namespace"]
    assert endpoint["tlsConfig"]["serverName"] == f"{service['metadata']['name']}.{namespace}.svc"
    cert_file = tomllib.loads(config_text(objects))["http"]["tls"]["cert_file"]
    assert ca["name"] == secret_mounts(objects)[str(Path(cert_file).parent)], (
        "the CA of the mounted certificate"
    )
    for ref in endpoint["basicAuth"].values():
        assert ref["key"] in examples[ref["name"]]["stringData"]
        assert examples[ref["name"]]["metadata"]["namespace"] == namespace, "the Operator reads it there"


def test_exec_probe_command_succeeds_against_the_daemon(start_service):
    """The exec-probe overlay's command, pointed at a running daemon, exits 0; a wrong AE title does not."""
    objects = render("overlays/exec-probe")
    command = probes(objects)["readinessProbe"]["exec"]["command"]
    running = start_service()
    running.wait_ready()
    called, _, hostport = command[2].partition("@")
    host = hostport.rpartition(":")[0]
    script = venv_tool(command[0])
    argv = [script, *command[1:2], f"{called}@{host}:{running.port()}", *command[3:]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    argv[2] = f"NOT_{called}@{host}:{running.port()}"
    assert subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode != 0


# -- the image, replayed -----------------------------------------------------


def _metric_total(port: int, name: str, **labels: str) -> float:
    _status, body, _headers = http_get(port, METRICS_PATH)
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _ready(port: int) -> bool:
    try:
        return http_get(port, READINESS_PATHS[0])[0] == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _memory_limit_bytes() -> int:
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    value = main["resources"]["limits"]["memory"]
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value)
    assert match, f"unexpected memory quantity {value!r}"
    return int(match.group(1)) * {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}[match.group(2)]


def _rss_bytes(pid: int) -> int | None:
    status = Path(f"/proc/{pid}/status")
    match = re.search(r"VmRSS:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(match.group(1)) * 1024 if match else None


# An A-ASSOCIATE-RQ whose first item says 256 bytes and carries 5: pynetdicom's decoder asserts the length,
# so it raises AssertionError, unless the bytecode was compiled without asserts (as python -OO would).
TRUNCATED_ITEM = """
import struct, pynetdicom, pynetdicom.pdu as pdu
fixed = struct.pack(">HH16s16s32s", 1, 0, b"ECHOSCP".ljust(16), b"PEER".ljust(16), bytes(32))
body = fixed + struct.pack(">BBH", 0x10, 0, 256) + b"1.2.8"
print(pynetdicom.__doc__, pdu.A_ASSOCIATE_RQ.decode.__doc__)
try:
    pdu.A_ASSOCIATE_RQ().decode(struct.pack(">BBL", 0x01, 0, len(body)) + body)
except AssertionError:
    print("AssertionError")
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_install_and_entrypoint_replayed(tmp_path):
    """The builder's venv recipe run as ENTRYPOINT+CMD with compose's environment echoes, counts, exits 0."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    # Builder stage: the script its RUN runs, with this interpreter for the base's.
    venv = tmp_path / "venv"
    (run,) = [r for r in instruction("RUN", stage="all") if RUNTIME_VENV_SCRIPT in r]
    assert run.split() == ["sh", RUNTIME_VENV_SCRIPT, "python", IMAGE_VENV, "/src"], run
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_QUIET": "1"}
    subprocess.run(
        ["sh", RUNTIME_VENV_SCRIPT, sys.executable, str(venv), str(REPO)],
        check=True,
        cwd=REPO,
        env=pip_env,
        timeout=540,
    )
    python = str(venv / "bin" / "python")
    assert not (venv / "bin" / "pip").exists(), "the venv keeps no pip"
    # Its dependencies' bytecode has no docstrings, and pynetdicom's PDU decoder still asserts.
    checked = subprocess.run([python, "-c", TRUNCATED_ITEM], capture_output=True, text=True, timeout=60)
    assert checked.stdout.split() == ["None", "None", "AssertionError"], checked.stdout + checked.stderr

    # Final stage: config at its image path (moved under tmp), ENV, then ENTRYPOINT + CMD.
    etc = tmp_path / "etc-echo-scp"
    etc.mkdir()
    shutil.copy(CONFIG, etc / "echo-scp.toml")
    image_env = dockerfile_env()
    env = {
        "PATH": image_env["PATH"].replace(IMAGE_VENV, str(venv)).replace("$PATH", os.environ["PATH"]),
        **{k: v for k, v in image_env.items() if k != "PATH"},
        **compose_environment("echo-scp"),
    }
    dicom_port, http_port = free_port(), free_port()
    # Free ports instead of the published ones, and loopback instead of all interfaces.
    env.update(
        ECHO_SCP_PORT=str(dicom_port),
        ECHO_SCP_HTTP__PORT=str(http_port),
        ECHO_SCP_HOST="127.0.0.1",
        ECHO_SCP_HTTP__HOST="127.0.0.1",
    )
    argv = [*exec_form("ENTRYPOINT"), *exec_form("CMD")]
    argv = [str(etc / "echo-scp.toml") if a == IMAGE_CONFIG else a for a in argv]
    argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
    assert argv[0].startswith(str(venv)), "ENTRYPOINT must resolve into the venv via PATH"
    health = healthcheck()
    health[0] = shutil.which(health[0], path=env["PATH"]) or health[0]

    log_path = tmp_path / "daemon.log"
    with (
        log_path.open("w") as log,
        subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=log) as proc,
    ):
        try:
            wait_for(lambda: proc.poll() is not None or _ready(http_port), timeout=30)
            assert proc.poll() is None, f"daemon exited early:\n{log_path.read_text()}"

            ae = AE(ae_title="REPLAY")
            ae.add_requested_context(Verification)
            ae.acse_timeout = 5
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title=env["ECHO_SCP_AE_TITLE"])
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            wait_for(lambda: _metric_total(http_port, "echo_scp_echo_requests_total", status="success") == 1)

            checked = subprocess.run(health, env=env, capture_output=True, text=True, timeout=10)
            assert checked.returncode == 0, checked.stderr

            rss = _rss_bytes(proc.pid)
            if rss is not None:
                print(f"idle RSS after one C-ECHO: {rss / 2**20:.1f} MiB")
                assert rss < _memory_limit_bytes(), f"idle RSS {rss} B exceeds the Deployment's memory limit"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert code == 0, log_path.read_text()
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and all(json.loads(line) for line in lines), "ECHO_SCP_LOG__FORMAT=json gives JSON lines"
    # After the daemon is gone the healthcheck must fail, or it would prove nothing.
    assert subprocess.run(health, env=env, capture_output=True, timeout=10).returncode != 0
