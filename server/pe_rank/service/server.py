"""Wiring: one gRPC server (pe_rank.v1, tei.v1, health, reflection) and the optional HTTP APIs,
on one event loop over one RankingService; drain on stop."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..tei.v1 import tei_pb2_grpc as tei_grpc
from ..v1 import ranker_pb2_grpc as pb_grpc
from . import tei
from .app import SERVICE_NAME, RankerService, RankingService, RepositoryView, ServiceConfig
from .auth import AuthOptions
from .decoding import DecodeGuard
from .errors import InvalidArgument
from .metrics import Metrics
from .pool import TritonPool

log = logging.getLogger("pe_rank.service")
EXIT_TRITON_GAVE_UP = 69  # sysexits EX_UNAVAILABLE: the embedded Triton could not be kept running


class RankingServer:
    """Start with ``await start()``; ``await stop()`` drains in-flight requests first."""

    def __init__(self, config: ServiceConfig, auth: AuthOptions | None = None) -> None:
        self.config = config
        self.auth = auth or AuthOptions()
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        self.pool = TritonPool(config.triton_urls, on_health_change=self._health_changed, poll_s=config.health_poll_s)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.http = None
        self.http_port: int | None = None
        self._pending_health: set[asyncio.Task] = set()

    def _undecodable(self, error: InvalidArgument, method: str) -> str:
        request_id = self.ranking.new_request_id()
        self.ranking.refused(error, request_id, method.strip("/").split("/")[0].rsplit(".", 1)[0])
        return request_id

    def _health_changed(self, serving: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._set_health(serving))
        self._pending_health.add(task)
        task.add_done_callback(self._pending_health.discard)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        log.info("health: %s", "SERVING" if serving else "NOT_SERVING")

    async def start(self) -> int:
        repo = RepositoryView(self.config.repository)
        limit = self.config.max_message_mb << 20
        interceptors = [*self.auth.interceptors(lambda reason: self.metrics.unauthenticated.labels(reason).inc()),
                        DecodeGuard(self._undecodable, (SERVICE_NAME, *tei.SERVICE_NAMES))]
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                               ("grpc.max_send_message_length", limit)],
                                      interceptors=interceptors)
        self.ranking = RankingService(self.config, repo, self.pool, self.metrics)
        pb_grpc.add_RankerServicer_to_server(RankerService(self.ranking), self.server)
        tei_grpc.add_InfoServicer_to_server(tei.TeiInfo(self.ranking), self.server)
        tei_grpc.add_RerankServicer_to_server(tei.TeiRerank(self.ranking), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, *tei.SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert and self.config.tls_key:
            client_ca = self.auth.client_ca.read_bytes() if self.auth.client_ca else None
            creds = grpc.ssl_server_credentials([(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
                                                root_certificates=client_ca, require_client_auth=client_ca is not None)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self._set_health(False)
        await self.pool.start()
        await self._set_health(self.pool.serving)
        if self.config.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry)
        await self.server.start()
        if self.config.http_port is not None:
            from .http_api import HttpServer

            tls = self.config.tls_cert and self.config.tls_key
            self.http = HttpServer(self.ranking, self.config.host, self.config.http_port,
                                   ssl_certfile=str(self.config.tls_cert) if tls else None,
                                   ssl_keyfile=str(self.config.tls_key) if tls else None,
                                   grace_s=self.config.grace_s)
            self.http_port = await self.http.start()
            log.info("HTTP APIs (TEI, Cohere/Jina) on %s:%s", self.config.host, self.http_port)
        log.info("pe-rank serving on %s:%s (Triton: %s)", self.config.host, self.port, ", ".join(self.config.triton_urls))
        return self.port

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers move away), then let in-flight requests finish."""
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        # both stop taking requests and let running ones finish, within the same grace
        stopping = [self.server.stop(self.config.grace_s)]
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        self.http = None
        await self.pool.close()
        self.ranking.workers.shutdown(wait=False, cancel_futures=True)
        self.server = None


async def serve_until_signalled(config: ServiceConfig, auth: AuthOptions | None = None,
                                watch_fatal: Callable[[Callable[[str], None]], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (exit code 0) or a fatal report (EXIT_TRITON_GAVE_UP).

    ``watch_fatal(report)`` hands a thread-safe ``report(reason)`` to whoever can detect a
    fault the server cannot recover from (the Triton supervisor after N failed restarts).
    """
    server = RankingServer(config, auth)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    fatal: list[str] = []

    def report(reason: str) -> None:
        def on_loop() -> None:
            fatal.append(reason)
            stop.set()
        loop.call_soon_threadsafe(on_loop)

    if watch_fatal is not None:
        watch_fatal(report)
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"pe-rank ready on {config.host}:{server.port}. Try:\n"
          f"  pe-rank rerank --server {config.host}:{server.port} --input examples/dl19_request.json", flush=True)
    if server.http_port is not None:
        scheme = "https" if config.tls_cert else "http"
        print(f"HTTP APIs (TEI and vLLM /rerank, Cohere/Jina /v1/rerank and /v2/rerank, Infinity /infinity/rerank, "
              f"NVIDIA NIM /v1/ranking) on "
              f"{scheme}://{config.host}:{server.http_port}; OpenAPI at /docs and /openapi.json", flush=True)
    await stop.wait()
    if fatal:
        log.critical("exiting with code %d: %s", EXIT_TRITON_GAVE_UP, fatal[0])
    log.info("stopping: draining in-flight requests (up to %.0f s)", config.grace_s)
    await server.stop()
    return EXIT_TRITON_GAVE_UP if fatal else 0
