"""Wiring: one gRPC server (pe_rank.v1, tei.v1, health, reflection) and the optional HTTP APIs,
on one event loop over one RankingService; drain on stop."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
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
_AFTER_DRAIN_GRACE_S = 1.0  # for calls that are not ranking (info, reflection) once ranking has drained
EXIT_TRITON_GAVE_UP = 69  # sysexits EX_UNAVAILABLE: the embedded Triton could not be kept running


class RankingServer:
    """Start with ``await start()``; ``await stop()`` drains in-flight requests first."""

    def __init__(self, config: ServiceConfig, auth: AuthOptions | None = None) -> None:
        self.config = config
        self.auth = auth or AuthOptions()
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        self.pool = TritonPool(config.triton_urls, on_health_change=self._health_changed, poll_s=config.health_poll_s,
                               credentials=config.triton_credentials)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.http = None
        self.http_port: int | None = None
        self._pending_health: set[asyncio.Task] = set()
        self._health_logged: bool | None = None

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
        if serving != self._health_logged:  # start-up sets it once more after the pool's first check
            self._health_logged = serving
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
                                   api_keys=self.auth.api_keys,
                                   ssl_client_ca=str(self.auth.client_ca) if tls and self.auth.client_ca else None)
            self.http_port = await self.http.start()
            log.info("HTTP APIs (TEI, vLLM, Cohere/Jina, Infinity, NVIDIA NIM) on %s:%s", self.config.host, self.http_port)
        log.info("pe-rank serving on %s:%s (Triton: %s)", self.config.host, self.port, ", ".join(self.config.triton_urls))
        return self.port

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers move away), then let in-flight requests finish.

        The transports stay open while ranking drains: a call that arrives meanwhile is refused by the service
        (UNAVAILABLE / 503, retryable) instead of being cancelled by a stopping gRPC server. Once nothing ranks,
        what is left open (health Watch streams) gets a short grace, not the whole of ``--grace``.
        """
        if self.server is None:
            return
        began = time.monotonic()
        self.ranking.closing = True  # before health turns: a client that saw NOT_SERVING is refused
        await self.health.enter_graceful_shutdown()
        if not await self.ranking.drained(self.config.grace_s):
            self.ranking.grace_over = True
            log.warning("grace of %.0f s over with %d requests still ranking: cancelling them",
                        self.config.grace_s, self.ranking.in_flight)
        final = max(min(self.config.grace_s - (time.monotonic() - began), _AFTER_DRAIN_GRACE_S), 0.0)
        stopping = [self.server.stop(final)]
        if self.http is not None:
            stopping.append(self.http.stop(final))
        await asyncio.gather(*stopping)
        self.http = None
        await self.pool.close()
        self.ranking.workers.shutdown(wait=False, cancel_futures=True)
        self.server = None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_doors(config: ServiceConfig, auth: AuthOptions) -> list[str]:
    """Ports and APIs left open where an operator would expect them closed: one warning line each."""
    host, doors = config.host, []
    if not auth.enabled and not _loopback(host):
        doors.append(f"serving on {host} without authentication: anyone who reaches port {config.port}"
                     + (f" or {config.http_port}" if config.http_port is not None else "")
                     + " can rank (set --api-key-file and/or --tls-client-ca)")
    if auth.api_keys is not None and not config.tls_cert and not _loopback(host):
        doors.append(f"API keys travel in plaintext on {host} (no --tls-cert/--tls-key): anyone on the path reads them")
    if auth.enabled and config.metrics_port is not None:
        doors.append(f"the Prometheus port {host}:{config.metrics_port} needs no key and no certificate "
                     "(counters only): keep it on a private address")
    if auth.enabled and config.triton_credentials is None:
        doors.append(f"calls to Triton ({', '.join(config.triton_urls)}) are plaintext and Triton asks no key: "
                     "make sure only this server can reach its ports (e.g. deploy/k8s's NetworkPolicy)")
    if auth.enabled and config.triton_metrics_port is not None and config.triton_credentials is not None:
        doors.append(f"the embedded Triton's metrics on 127.0.0.1:{config.triton_metrics_port} need no key "
                     "(read-only counters; Triton cannot lock them); its gRPC is mutual TLS and its HTTP is off")
    return doors


def _command() -> str:
    """How to run pe-rank from here: ``pe-rank`` when it is on PATH, else this install's script."""
    script = Path(sys.executable).parent / "pe-rank"
    on_path = shutil.which("pe-rank")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        return "pe-rank"
    if script.exists():
        try:
            return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
        except ValueError:  # another drive
            return str(script)
    return f"{sys.executable} -m pe_rank"


def banner(config: ServiceConfig, auth: AuthOptions, port: int, http_port: int | None) -> str:
    """What to run to try the server, with the flags this server needs (key, CA, client certificate)."""
    flags = ""
    if auth.api_keys is not None:
        flags += f" --api-key-file {auth.api_key_file or 'KEYFILE'}"
    if config.tls_cert:
        flags += " --tls-ca CA.pem"
    if auth.client_ca is not None:
        flags += " --tls-client-cert CLIENT.pem --tls-client-key CLIENT.key"
    lines = [f"pe-rank ready on {config.host}:{port}. Try:",
             f"  {_command()} rerank --server {config.host}:{port} --input examples/dl19_request.json{flags}"]
    if http_port is not None:
        scheme = "https" if config.tls_cert else "http"
        lines.append(f"HTTP APIs (TEI and vLLM /rerank, Cohere/Jina /v1/rerank and /v2/rerank, Infinity /infinity/rerank, "
                     f"NVIDIA NIM /v1/ranking) on {scheme}://{config.host}:"
                     f"{http_port}; OpenAPI at /docs and /openapi.json")
        curl = f"  curl -s {scheme}://{config.host}:{http_port}/rerank -H 'content-type: application/json'"
        if auth.api_keys is not None:
            curl += ' -H "Authorization: Bearer $KEY"'
        if config.tls_cert:
            curl += " --cacert CA.pem"
        if auth.client_ca is not None:
            curl += " --cert CLIENT.pem --key CLIENT.key"
        lines.append(curl + """ -d '{"query": "what do fleas eat", "texts": ["Fleas feed on blood.", "The sky is blue."]}'""")
    if auth.api_keys is not None:
        lines.append("Every call but health (and HTTP /health, /openapi.json, /docs) needs 'Authorization: Bearer KEY'"
                     + (f", KEY a line of {auth.api_key_file}" if auth.api_key_file else ""))
    return "\n".join(lines)


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
    for door in open_doors(config, server.auth):
        log.warning("open door: %s", door)
    print(banner(config, server.auth, server.port, server.http_port), flush=True)
    await stop.wait()
    if fatal:
        log.critical("exiting with code %d: %s", EXIT_TRITON_GAVE_UP, fatal[0])
    log.info("stopping: draining in-flight requests (up to %.0f s)", config.grace_s)
    await server.stop()
    return EXIT_TRITON_GAVE_UP if fatal else 0
