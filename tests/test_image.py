"""The container image: the project's Dockerfile built with podman and run as compose and Kubernetes run it.

The official python base image cannot be pulled here, so the session makes a
stand-in from Debian packages with mmdebstrap (the suite and Python version
named by the Dockerfile's PYTHON_IMAGE, with the official image's
/usr/local/bin/python3.11 path) and builds the Dockerfile, unchanged, on top
of it in its hermetic mode: a wheelhouse downloaded on the host with the
host's own pip configuration and trust store, passed as a build context,
installed with PIP_NO_INDEX=1 under --network=none. Podman runs rootful with
its own storage and a containers.conf written here (runc, cgroupfs, ulimits
within the host's, no systemd). Containers run the docker-compose.yml service
definitions (environment, ports rebound to free loopback ports, mounts,
read-only root, tmpfs, capabilities, no-new-privileges, healthcheck). Compose's
Prometheus and Grafana services need images from a registry; the Prometheus
side is covered by tests/test_prometheus.py with Debian's prometheus.

Compose itself (or podman-compose) is not used: `up` would publish DICOM on
all interfaces and pull the Prometheus and Grafana images, so this file runs
each echo-scp service's definition with podman run instead, and fails when the
compose file gains a key it does not translate.

Set ECHO_SCP_TEST_DEBIAN_MIRROR to a mirror URL (or an apt sources file) when
deb.debian.org is not reachable.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from echo_scp import __version__
from tests.conftest import (
    REPO,
    associate,
    free_port,
    http_get,
    http_ready,
    require_tool,
    skip_unless_ci,
    wait_for,
)
from tests.test_deploy import TRUNCATED_ITEM, exec_form, healthcheck, seconds

pytestmark = [pytest.mark.slow, pytest.mark.peer, pytest.mark.timeout(900)]

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
IMAGE_CONFIG = "/etc/echo-scp/echo-scp.toml"
IMAGE_UID = 10001
# docker's and podman's stop timeout unless told otherwise.
ENGINE_STOP_TIMEOUT = 10.0
# What the Dockerfile may add on top of its base: the venv and the config.
MAX_ADDED_BYTES = 50 * 2**20
# Compose service keys this file knows how to run; anything new must be taught here.
RUNNABLE_KEYS = {
    "build",
    "image",
    "restart",
    "stop_grace_period",
    "read_only",
    "tmpfs",
    "cap_drop",
    "security_opt",
    "healthcheck",
    "ports",
    "environment",
    "secrets",
    "profiles",
}
# Run inside a container: PID 1 and the sandbox it lives in, as JSON.
INSPECT_SANDBOX = r"""
import json
status = dict(line.split(":", 1) for line in open("/proc/1/status").read().splitlines())
mounts = {parts[1]: (parts[2], parts[3].split(",")) for parts in
          (line.split() for line in open("/proc/mounts").read().splitlines())}
print(json.dumps({
    "cmdline": open("/proc/1/cmdline").read().split("\0")[:-1],
    "uid": status["Uid"].split(),
    "cap_eff": status["CapEff"].strip(),
    "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "root": mounts["/"],
    "tmp": mounts.get("/tmp"),
    "rss_kib": status["VmRSS"].split()[0],
}))
"""

# Run inside the image (as root, to see every directory): what must not be in the final stage.
INSPECT_CONTENTS = r"""
import importlib.util, json, os, shutil, sys

def walk(top):
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
        yield root, dirs, files

everything = list(walk("/"))
venv = [(root, dirs, files) for root, dirs, files in everything if root.startswith(sys.prefix)]
print(json.dumps({
    "compilers": [c for c in ("gcc", "cc", "c++", "g++", "clang", "make") if shutil.which(c)],
    "pip_in_venv": importlib.util.find_spec("pip") is not None,
    "build_leftovers": [p for p in ("/src", "/wheels", "/wheelhouse") if os.path.exists(p)],
    "caches": [os.path.join(root, d) for root, dirs, _ in everything for d in dirs
               if d == "pip" and os.path.basename(root) == ".cache"],
    "tests": [os.path.join(root, d) for root, dirs, _ in venv for d in dirs if d in ("tests", "test_files")],
    "venv_bytes": sum(os.path.getsize(os.path.join(root, f)) for root, _, files in venv for f in files
                      if not os.path.islink(os.path.join(root, f))),
    "license": any(f == "LICENSE" and "echo_scp-" in root for root, _, files in venv for f in files),
}))
"""


# -- podman ---------------------------------------------------------------------


class Podman:
    """Rootful podman with its own storage and containers.conf under one directory."""

    def __init__(self, executable: str, root: Path) -> None:
        self.executable = executable
        self.root = root
        nofile = _ulimit(resource.RLIMIT_NOFILE)
        nproc = _ulimit(resource.RLIMIT_NPROC)
        (root / "containers.conf").write_text(
            "[containers]\n"
            # podman's default (1048576) is above what this host lets a process have.
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            # No systemd here: cgroupfs, and events to a file instead of journald.
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/tmp"\n'
        )
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{root}/run"\ngraphroot = "{root}/storage"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
        }

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.executable, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", name, "--format", template).stdout.strip()

    def running(self, name: str) -> bool:
        return self.inspect(name, "{{.State.Running}}") == "true"

    def logs(self, name: str) -> list[dict[str, Any]]:
        """The container's JSON log lines (podman's own messages on stderr left out)."""
        out = self("logs", name).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def clean_up(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False)


def _ulimit(which: int) -> int:
    """The issue's 20000, or the host's hard limit where that is lower."""
    _soft, hard = resource.getrlimit(which)
    return 20000 if hard == resource.RLIM_INFINITY else min(20000, hard)


def _dockerfile_default(name: str) -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"the Dockerfile has no ARG {name} default")


@dataclass
class Image:
    """The built image and what is known about its build."""

    podman: Podman
    ref: str
    base: str
    build_seconds: float
    containers: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Podman with a private storage root for this session, emptied at the end."""
    executable = require_tool("podman")
    require_tool("runc")
    if os.geteuid() != 0:
        skip_unless_ci("the image tests run rootful podman: run them as root, as .ci/run does")
    runner = Podman(executable, tmp_path_factory.mktemp("podman"))
    yield runner
    runner.clean_up()


@pytest.fixture(scope="session")
def stand_in_base(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Debian-made stand-in for PYTHON_IMAGE, with the official image's interpreter paths."""
    mmdebstrap = require_tool("mmdebstrap")
    official = _dockerfile_default("PYTHON_IMAGE")
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-(\w+)(@sha256:[0-9a-f]{64})?", official)
    assert match, f"unexpected PYTHON_IMAGE {official!r}"
    python, suite = match.group(1), match.group(2)
    rootfs = tmp_path_factory.mktemp("stand-in") / "rootfs.tar"
    # The official image's python lives in /usr/local/bin, and the venv the
    # Dockerfile builds points there: give Debian's interpreter the same paths.
    links = (
        f'ln -s /usr/bin/python{python} "$1/usr/local/bin/python{python}"'
        f' && ln -s python{python} "$1/usr/local/bin/python3"'
        ' && ln -s python3 "$1/usr/local/bin/python"'
    )
    slim = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    mirror = os.environ.get("ECHO_SCP_TEST_DEBIAN_MIRROR", "")
    result = subprocess.run(
        [
            mmdebstrap,
            "--quiet",
            "--variant=essential",
            # What the Dockerfile runs: python -m venv, pip wheel, groupadd/useradd.
            f"--include=python{python},python{python}-venv,python3-pip,passwd",
            *slim,
            f"--customize-hook={links}",
            suite,
            str(rootfs),
            *([mirror] if mirror else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mmdebstrap failed:\n{result.stderr[-3000:]}"
    tag = f"localhost/echo-scp-test-base:{suite}-python{python}"
    podman(
        "import",
        "--change",
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        str(rootfs),
        tag,
        timeout=300,
    )
    rootfs.unlink()
    return tag


@pytest.fixture(scope="session")
def wheelhouse(podman: Podman, stand_in_base: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime dependencies and build backend as wheels for the base's Python, fetched by the host."""
    probe = "import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.machine())"
    version, machine = podman("run", "--rm", stand_in_base, "python", "-c", probe).stdout.split()
    assert machine == platform.machine(), "the wheelhouse is fetched for the host's architecture"
    folder = tmp_path_factory.mktemp("wheelhouse")
    build_requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    # deploy/README.md ("Air-gapped builds") documents the same command.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            str(folder),
            "--only-binary=:all:",
            "--python-version",
            version,
            "--platform",
            f"manylinux2014_{machine}",
            str(REPO),
            *build_requires,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"pip download failed:\n{result.stderr[-3000:]}"
    return folder


@pytest.fixture(scope="session")
def image(podman: Podman, stand_in_base: str, wheelhouse: Path) -> Image:
    """The project's Dockerfile, unchanged, built hermetically on the stand-in base."""
    ref = f"localhost/echo-scp:test-{__version__}"
    started = time.monotonic()
    podman(
        "build",
        # HEALTHCHECK is a Docker image-format field; OCI images drop it.
        "--format=docker",
        "--pull=never",
        "--network=none",
        f"--build-context=wheelhouse={wheelhouse}",
        f"--build-arg=PYTHON_IMAGE={stand_in_base}",
        "--build-arg=PIP_NO_INDEX=1",
        "--tag",
        ref,
        str(REPO),
        timeout=600,
    )
    elapsed = time.monotonic() - started
    print(f"image build: {elapsed:.1f} s")
    return Image(podman, ref, stand_in_base, elapsed)


# -- compose services as podman runs ------------------------------------------------


def compose_service(name: str) -> dict[str, Any]:
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    unknown = set(service) - RUNNABLE_KEYS
    assert not unknown, f"teach test_image.py to run compose's {sorted(unknown)} for {name}"
    return dict(service)


def sandbox_args(service: dict[str, Any]) -> list[str]:
    """podman run options for a compose service's read_only, tmpfs, cap_drop, security_opt and environment."""
    args = []
    if service.get("read_only"):
        # Compose's read_only adds no tmpfs of its own; podman's would add /run and /var/tmp.
        args += ["--read-only", "--read-only-tmpfs=false"]
    tmpfs = service.get("tmpfs", [])
    for path in [tmpfs] if isinstance(tmpfs, str) else tmpfs:
        args += ["--tmpfs", path]
    for cap in service.get("cap_drop", []):
        args += ["--cap-drop", cap]
    for option in service.get("security_opt", []):
        args += ["--security-opt", option]
    for key, value in (service.get("environment") or {}).items():
        args += ["--env", f"{key}={value}"]
    return args


@dataclass
class Container:
    name: str
    ports: dict[int, int]

    def port(self, container_port: int) -> int:
        return self.ports[container_port]


def run_compose_service(
    image: Image,
    service_name: str,
    *,
    secrets: dict[str, Path] | None = None,
    engine_stop_timeout: bool = False,
) -> Container:
    """Start one compose service as `docker compose up` would, its ports on free loopback ports.

    With ``engine_stop_timeout`` the service's stop_grace_period is left out, so
    that podman stop waits its own default, as after a plain `docker run`.
    """
    service = compose_service(service_name)
    name = f"echo-scp-test-{os.getpid()}-{service_name}-{len(image.containers)}"
    args = ["run", "--detach", "--name", name, *sandbox_args(service)]
    if service.get("restart"):
        args += ["--restart", service["restart"]]
    if service.get("stop_grace_period") and not engine_stop_timeout:
        args += ["--stop-timeout", str(round(seconds(service["stop_grace_period"])))]
    check = service.get("healthcheck")
    if check:
        kind, *command = check["test"]
        assert kind == "CMD", "exec-form healthchecks only"
        args += ["--health-cmd", json.dumps(command)]
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                args += [f"--health-{key.replace('_', '-')}", check[key]]
        if "retries" in check:
            args += ["--health-retries", str(check["retries"])]
    ports: dict[int, int] = {}
    for spec in service.get("ports", []):
        container_port = int(str(spec).rsplit(":", 1)[-1])
        ports[container_port] = free_port()
        args += ["--publish", f"127.0.0.1:{ports[container_port]}:{container_port}"]
    # Compose mounts a file secret read-only at /run/secrets/<target>.
    for item in service.get("secrets", []):
        assert secrets is not None and item["target"] in secrets, f"no test file for secret {item}"
        args += ["--volume", f"{secrets[item['target']]}:/run/secrets/{item['target']}:ro"]
    image.podman(*args, image.ref)
    image.containers.append(name)
    return Container(name, ports)


def wait_serving(image: Image, container: Container, http_port: int = 8080) -> None:
    """Wait for /readyz 200 through the published port; fail at once if the container stops."""
    port = container.port(http_port)

    def ready() -> bool:
        if not image.podman.running(container.name):
            logs = image.podman("logs", container.name, check=False)
            pytest.fail(f"{container.name} stopped:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        return http_ready(port)

    wait_for(ready, timeout=60, interval=0.1)
    assert image.podman.inspect(container.name, "{{.RestartCount}}") == "0", "the daemon restarted"


@pytest.fixture(scope="module")
def echo_scp(image: Image) -> Iterator[Container]:
    """The compose file's echo-scp service, running until the end of this module."""
    container = run_compose_service(image, "echo-scp")
    wait_serving(image, container)
    yield container
    image.podman("rm", "--force", "--time", "0", container.name, check=False)


def echoscu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("echoscu"), *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def exec_json(image: Image, name: str, script: str) -> dict[str, Any]:
    result = image.podman("exec", name, "python", "-c", script)
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


# -- the image ------------------------------------------------------------------


def test_image_is_lean_labelled_and_keeps_its_healthcheck(image):
    """The final stage adds a venv under 50 MB: no compiler, pip, caches, tests, build files or docstrings."""
    (info,) = json.loads(image.podman("image", "inspect", image.ref).stdout)
    (base,) = json.loads(image.podman("image", "inspect", image.base).stdout)
    config = info["Config"]
    assert config["User"] == str(IMAGE_UID)
    assert config["Entrypoint"] == exec_form("ENTRYPOINT") and config["Cmd"] == exec_form("CMD")
    assert info["Healthcheck"]["Test"] == ["CMD", *healthcheck()]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert "MIT License" in (REPO / "LICENSE").read_text(), "the label names the LICENSE file's licence"

    inspect = ["run", "--rm", "--user=0", "--entrypoint=python", image.ref, "-c", INSPECT_CONTENTS]
    contents = json.loads(image.podman(*inspect).stdout)
    assert contents["compilers"] == [] and contents["caches"] == [] and contents["tests"] == []
    assert contents["build_leftovers"] == [] and contents["pip_in_venv"] is False
    assert contents["license"], "the wheel carries LICENSE into the venv"
    # The venv's bytecode has no docstrings, and pynetdicom's PDU decoder still asserts.
    checked = image.podman("run", "--rm", "--entrypoint=python", image.ref, "-c", TRUNCATED_ITEM)
    assert checked.stdout.split() == ["None", "None", "AssertionError"], checked.stdout
    added = info["Size"] - base["Size"]
    print(
        f"image {info['Size'] / 1e6:.1f} MB = stand-in base {base['Size'] / 1e6:.1f} MB"
        f" + {added / 1e6:.1f} MB (venv {contents['venv_bytes'] / 1e6:.1f} MB);"
        f" build {image.build_seconds:.1f} s"
    )
    assert added < MAX_ADDED_BYTES, f"the Dockerfile adds {added / 2**20:.1f} MiB to its base"


def test_compose_service_answers_echoscu_and_rejects_a_wrong_called_ae(image, echo_scp):
    """DCMTK echoscu succeeds through the published port; a wrong called AE title gets 1/1/7."""
    port = echo_scp.port(11112)
    ok = echoscu(port, "-aet", "IMAGETEST", "-aec", "ECHOSCP")
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(port, "-aec", "WRONG")
    assert bad.returncode != 0
    assert "Result: Rejected Permanent, Source: Service User" in bad.stderr, bad.stderr
    assert "Reason: Called AE Title Not Recognized" in bad.stderr, bad.stderr

    def rejected() -> list[dict[str, Any]]:
        return [e for e in image.podman.logs(echo_scp.name) if e.get("event") == "association_rejected"]

    (entry,) = wait_for(rejected)
    assert entry["code"] == "1/1/7" and entry["called_ae"] == "WRONG"


def test_compose_service_serves_health_and_metrics(echo_scp):
    """/livez and /readyz answer 200 and /metrics counts a C-ECHO sent to the container."""
    http = echo_scp.port(8080)
    assert http_get(http, "/livez")[0] == 200
    assert http_get(http, "/readyz")[0] == 200

    def successes() -> float:
        body = http_get(http, "/metrics")[1]
        return sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "echo_scp_echo_requests_total" and sample.labels.get("status") == "success"
        )

    before = successes()
    assoc = associate(echo_scp.port(11112), calling="METRICS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    wait_for(lambda: successes() == before + 1)
    status, body, headers = http_get(http, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'echo_scp_listener_up{listener="dicom"} 1.0' in body


def test_podman_healthcheck_run_passes(image, echo_scp):
    """podman healthcheck run reports healthy; the same command aimed at a closed port fails."""
    result = image.podman("healthcheck", "run", echo_scp.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    command = json.loads(image.podman.inspect(echo_scp.name, "{{json .Config.Healthcheck.Test}}"))
    assert command[0] == "CMD"
    elsewhere = image.podman(
        "exec", "--env", "ECHO_SCP_HTTP__PORT=1", echo_scp.name, *command[1:], check=False
    )
    assert elsewhere.returncode != 0, "a healthcheck that cannot fail proves nothing"


def test_container_runs_the_daemon_as_pid_1_locked_down(image, echo_scp):
    """PID 1 is the daemon, UID 10001, no capabilities, no-new-privileges, read-only root, tmpfs /tmp."""
    sandbox = exec_json(image, echo_scp.name, INSPECT_SANDBOX)
    interpreter, script, *argv = sandbox["cmdline"]
    assert Path(script).name == exec_form("ENTRYPOINT")[0] and argv == exec_form("CMD")
    assert interpreter.startswith("/opt/venv/bin/python")
    assert set(sandbox["uid"]) == {str(IMAGE_UID)}
    assert int(sandbox["cap_eff"], 16) == 0 and int(sandbox["cap_bnd"], 16) == 0
    assert sandbox["no_new_privs"] == "1"
    assert "ro" in sandbox["root"][1], f"root is mounted {sandbox['root']}"
    assert sandbox["tmp"] is not None and sandbox["tmp"][0] == "tmpfs" and "rw" in sandbox["tmp"][1]
    print(f"daemon RSS in the container: {int(sandbox['rss_kib']) / 1024:.1f} MiB")


def test_podman_stop_with_an_open_association_exits_0_within_the_default_timeout(image):
    """podman stop, with podman's default timeout, drains an idle association, aborts it and exits 0."""
    container = run_compose_service(image, "echo-scp", engine_stop_timeout=True)
    wait_serving(image, container)
    assert float(image.podman.inspect(container.name, "{{.Config.StopTimeout}}")) == ENGINE_STOP_TIMEOUT
    assoc = associate(container.port(11112), calling="HOLDER")
    assert assoc.is_established
    started = time.monotonic()
    image.podman("stop", container.name, timeout=60)
    elapsed = time.monotonic() - started
    print(f"podman stop with one idle association: {elapsed:.2f} s")
    assert image.podman.inspect(container.name, "{{.State.ExitCode}}") == "0", "SIGKILL (137) or a failure"
    assert elapsed < ENGINE_STOP_TIMEOUT
    wait_for(lambda: assoc.is_aborted)
    (done,) = [e for e in image.podman.logs(container.name) if e.get("event") == "shutdown_complete"]
    assert done["aborted"] == 1, "the association was still open when the grace period ended"


def test_check_config_with_a_bad_environment_variable_exits_2(image):
    """check-config in the container exits 2 naming a malformed ECHO_SCP_* variable, 0 without it."""
    base = ["run", "--rm", *sandbox_args(compose_service("echo-scp"))]
    command = [image.ref, "check-config", "--config", IMAGE_CONFIG]
    good = image.podman(*base, *command, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = image.podman(*base, "--env=ECHO_SCP_HTTP__PORT=eighty", *command, check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "ECHO_SCP_HTTP__PORT" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_compose_tls_profile_serves_with_mounted_certificates(image, tls_files, tmp_path):
    """The tls profile's service, certificates mounted as compose secrets, answers DCMTK over TLS only."""
    secrets = {}
    for target, source in {"tls.crt": "cert", "tls.key": "key", "ca.crt": "ca"}.items():
        secrets[target] = tmp_path / target
        shutil.copy(tls_files[source], secrets[target])
        # A throwaway key readable by UID 10001, as deploy/README.md says for test keys.
        secrets[target].chmod(0o644)
    container = run_compose_service(image, "echo-scp-tls", secrets=secrets)
    try:
        # Ready means the self-check reached the listener over TLS with the mounted files.
        wait_serving(image, container)
        port = container.port(2762)
        over_tls = echoscu(port, "+tla", "+cf", str(tls_files["ca"]), "-aec", "ECHOSCP")
        assert over_tls.returncode == 0, over_tls.stderr
        plain = echoscu(port, "-aec", "ECHOSCP")
        assert plain.returncode != 0, "the TLS port must not speak plain DICOM"
    finally:
        image.podman("rm", "--force", "--time", "0", container.name, check=False)
