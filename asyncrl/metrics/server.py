"""Serve a run's metrics on /metrics (127.0.0.1 unless told otherwise), stopped by handle."""

from __future__ import annotations

from prometheus_client import start_http_server

from asyncrl.metrics.names import RunMetrics


class MetricsServer:
    def __init__(self, metrics: RunMetrics, *, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host, self.port = host, self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
