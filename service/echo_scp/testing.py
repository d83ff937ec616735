"""An embeddable Verification SCP for other projects' tests, and a pytest fixture.

    from echo_scp.scu import echo
    from echo_scp.testing import EchoServer

    with EchoServer() as server:
        assert echo(server.address) == 0x0000

:class:`EchoServer` is the daemon itself (:class:`echo_scp.daemon.Service`) on
loopback port 0, with the HTTP endpoint off unless asked for. Installing
echo-scp registers this module as a pytest plugin (entry point ``pytest11``),
which provides the ``echo_server`` fixture: a started server, stopped after the
test. Give it constructor keywords with indirect parametrisation::

    @pytest.mark.parametrize("echo_server", [{"ae_title": "PACS"}], indirect=True)
    def test_probe(echo_server): ...

Importing this module needs neither pytest nor, until a server is built,
pynetdicom: pytest loads it into every session of the environment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from echo_scp.protocol import format_address

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from echo_scp.daemon import Service
    from echo_scp.settings import Settings

__all__ = ["EchoServer"]


class EchoServer:
    """A running echo-scp Verification SCP with one listener, for tests and embedding.

    ``listener_options`` are further listener settings (``max_associations``,
    ``transfer_syntaxes``, ``acse_timeout`` ...); ``tls`` is a mapping of TLS
    settings (``cert_file``, ``key_file``, ``ca_file``, ``client_certificates``
    ...). Invalid settings raise :class:`echo_scp.settings.ConfigError` here;
    a port that cannot be bound raises :class:`echo_scp.daemon.StartError`
    from :meth:`start`. ``registry`` and ``log`` go to the Service (default: a
    fresh registry, and a logger writing through stdlib logging).
    """

    def __init__(
        self,
        *,
        ae_title: str = "ECHOSCP",
        host: str = "127.0.0.1",
        port: int = 0,
        http: bool = False,
        http_port: int = 0,
        require_called_ae_title: bool = True,
        allowed_calling_ae_titles: Sequence[str] = (),
        tls: Mapping[str, Any] | None = None,
        registry: CollectorRegistry | None = None,
        log: Any = None,
        **listener_options: Any,
    ) -> None:
        # Imported here so that loading the pytest plugin stays cheap.
        from echo_scp.daemon import Service

        listener: dict[str, Any] = {
            **listener_options,
            "host": host,
            "port": port,
            "ae_title": ae_title,
            "require_called_ae_title": require_called_ae_title,
            "allowed_calling_ae_titles": list(allowed_calling_ae_titles),
        }
        if tls is not None:
            listener["tls"] = dict(tls)
        settings = _settings(
            {
                "listeners": [listener],
                "http": {"enabled": http, "host": host, "port": http_port},
            }
        )
        self.service: Service = Service(settings, registry=registry, log=log)
        self._state = "new"

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> EchoServer:
        """Bind and start serving; returns self. A stopped server cannot start again."""
        if self._state == "running":
            return self
        if self._state == "stopped":
            raise RuntimeError("a stopped EchoServer cannot be started again; create a new one")
        self.service.start()
        self._state = "running"
        return self

    def stop(self) -> None:
        """Stop accepting, let open associations finish (within the grace period), free the ports."""
        if self._state == "running":
            self.service.stop()
        self._state = "stopped"

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is --------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the listener is bound to."""
        return self.service.listeners[0].address[0]

    @property
    def port(self) -> int:
        """The bound port (the real one when configured as 0); only known once started."""
        if self._state == "new":
            raise RuntimeError("the EchoServer is not started yet, so its port is not known")
        return self.service.listeners[0].address[1]

    @property
    def ae_title(self) -> str:
        """The listener's AE title, which callers must use as the called AE title."""
        return self.service.listeners[0].settings.ae_title

    @property
    def address(self) -> str:
        """``AET@host:port`` (``AET@[host]:port`` for IPv6), as :func:`echo_scp.scu.echo` takes it."""
        return f"{self.ae_title}@{format_address(self.host, self.port)}"

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP endpoint (/livez, /readyz, /metrics), or None when it is off."""
        http = self.service.http
        return None if http is None else http.port

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry holding the server's metrics."""
        return self.service.registry

    def __repr__(self) -> str:
        where = self.address if self._state != "new" else f"{self.ae_title}@{self.host}:?"
        return f"<EchoServer {where} {self._state}>"


def _settings(overrides: Mapping[str, Any]) -> Settings:
    """Settings from ``overrides`` alone: no environment, no config file."""
    from echo_scp.settings import load_settings

    return load_settings(None, environ={}, overrides=overrides)


try:
    import pytest
except ImportError:  # pytest is optional: without it there is simply no fixture
    pass
else:

    @pytest.fixture
    def echo_server(request: pytest.FixtureRequest) -> Iterator[EchoServer]:
        """A started EchoServer on a free loopback port, stopped after the test.

        Indirect parametrisation passes a dict of EchoServer keywords.
        """
        options: Mapping[str, Any] = getattr(request, "param", None) or {}
        with EchoServer(**options) as server:
            yield server
