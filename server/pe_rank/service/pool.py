"""Every Triton behind one gRPC channel: windows are spread by gRPC's own round_robin, no pinning.

A window is one stateless pe_llm call, so any ready Triton can take any window of any
request. The channel's target lists every address (``ipv4:a:p,b:q``), or is one DNS name
that resolves to several (a Kubernetes headless Service); gRPC's ``round_robin`` policy
sends each call to the next READY server and skips broken connections. A call that still
fails UNAVAILABLE (its server died mid-call) is tried again, so a request survives losing a
Triton while another is ready. Readiness (server live, every model ready) is polled per
configured address for the health service.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

log = logging.getLogger("pe_rank.pool")

REQUIRED_MODELS = ("pe_tokenizer", "pe_encoder", "pe_projector", "pe_embed", "pe_llm")
# A restarted Triton should be seen within about a second: gRPC's default reconnect backoff
# grows to 120 s, which left the service NOT_SERVING ~10 s after an embedded Triton was back.
_CHANNEL_ARGS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                 ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000)]
_BALANCED = [*_CHANNEL_ARGS, ("grpc.lb_policy_name", "round_robin")]


class NoTritonAvailable(RuntimeError):
    pass


_STATUS = {str(code): code for code in grpc.StatusCode}  # tritonclient keeps str(rpc_error.code())


def triton_status(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status a tritonclient error carries (its ``status()``), if it carries one."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    return _STATUS.get(status) if isinstance(status, str) else None


def balanced_target(urls: list[str]) -> str:
    """One gRPC target for every Triton: the URL itself when there is one, else ``ipv4:``/``ipv6:`` lists."""
    if len(urls) == 1:
        return urls[0]
    hosts = []
    for url in urls:
        host, _, port = url.rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        try:
            hosts.append((ipaddress.ip_address(host), port))
        except ValueError:
            raise ValueError(f"--triton-url {url}: several Tritons must be given as IP:PORT; for host names give "
                             "one DNS name that resolves to every Triton (e.g. dns:///triton-headless:8001)") from None
    if len({ip.version for ip, _ in hosts}) > 1:
        raise ValueError("--triton-url: mix of IPv4 and IPv6 addresses; use one family")
    if hosts[0][0].version == 4:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in hosts)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in hosts)


class FailoverClient:
    """The balanced tritonclient, trying a call again when its Triton was unavailable."""

    def __init__(self, client, retries: int = 2, backoff_s: float = 0.05) -> None:
        self.client, self.retries, self.backoff_s = client, retries, backoff_s

    async def infer(self, model_name: str, inputs: list, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return await self.client.infer(model_name, inputs, **kwargs)
            except Exception as exc:
                if attempt == self.retries or triton_status(exc) is not grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("%s call: Triton unavailable; retrying on another Triton", model_name)
                await asyncio.sleep(self.backoff_s * 2**attempt)


@dataclass
class TritonServerState:
    url: str
    client: object  # for readiness probes of this one address
    healthy: bool = False
    last_error: str = ""


@dataclass
class TritonPool:
    urls: list[str]
    on_health_change: Callable[[bool], None] = lambda serving: None
    poll_s: float = 1.0
    servers: list[TritonServerState] = field(default_factory=list)
    credentials: object = None  # grpc.ChannelCredentials for a locked embedded Triton (mutual TLS); None: plaintext

    def __post_init__(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.target = balanced_target(self.urls)
        self.client = FailoverClient(grpcclient.InferenceServerClient(self.target, channel_args=_BALANCED,
                                                                      creds=self.credentials))
        self.servers = [TritonServerState(u, grpcclient.InferenceServerClient(u, channel_args=_CHANNEL_ARGS,
                                                                              creds=self.credentials))
                        for u in self.urls]
        self._task: asyncio.Task | None = None
        self._refreshes: set[asyncio.Task] = set()
        self._serving = False

    @property
    def serving(self) -> bool:
        return self._serving

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.client.close()
        for server in self.servers:
            await server.client.close()

    def acquire(self) -> FailoverClient:
        """The balanced client, if any Triton is ready."""
        if not self.serving:
            raise NoTritonAvailable("no Triton server is ready: " + "; ".join(
                f"{s.url}: {s.last_error or 'not ready'}" for s in self.servers))
        return self.client

    def mark_down(self, reason: str) -> None:
        """After a call failed UNAVAILABLE on every try: check every server now, not at the next poll."""
        log.warning("Triton unavailable: %s", reason)
        task = asyncio.get_running_loop().create_task(self.refresh())
        self._refreshes.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._refreshes.discard)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._check(s) for s in self.servers))
        serving = any(s.healthy for s in self.servers)
        if serving and not self._serving:
            serving = await self._calls_get_through()
        if serving != self._serving:
            self._serving = serving
            self.on_health_change(serving)

    async def _calls_get_through(self, within_s: float = 2.0) -> bool:
        """SERVING only once the calls' own balanced channel reaches a Triton.

        Readiness is probed per address on other channels; the balanced one reconnects on its
        own backoff (up to 1 s), and calls sent in between failed UNAVAILABLE right after
        health said SERVING.
        """
        deadline = time.monotonic() + within_s
        while True:
            with contextlib.suppress(Exception):
                if await self.client.client.is_server_live(client_timeout=1.0):
                    return True
            if time.monotonic() >= deadline:
                log.warning("Triton is ready but the calls' channel does not reach it yet; next poll")
                return False
            await asyncio.sleep(0.1)

    async def _check(self, server: TritonServerState) -> None:
        try:
            ready = await asyncio.wait_for(self._all_ready(server), timeout=max(self.poll_s, 1.0) * 2)
            error = "" if ready else "models not ready"
        except Exception as exc:  # unreachable, timed out, or mid-restart
            ready, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if ready and not server.healthy:
            log.info("Triton %s is ready", server.url)
        elif not ready and server.healthy:
            log.warning("Triton %s not ready: %s", server.url, error)
        server.healthy, server.last_error = ready, error

    async def _all_ready(self, server: TritonServerState) -> bool:
        if not await server.client.is_server_live():
            return False
        ready = await asyncio.gather(*(server.client.is_model_ready(m) for m in REQUIRED_MODELS))
        return all(ready)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()
