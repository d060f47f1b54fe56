"""Several Triton servers behind one service: least in-flight choice, health polling.

A request takes one server for its whole life, so every window's sequence stays on the
server that started it. A server that fails a call or a readiness poll is marked down
and comes back by itself when it answers ready again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

log = logging.getLogger("pe_rank.pool")

REQUIRED_MODELS = ("pe_tokenizer", "pe_encoder", "pe_projector", "pe_embed", "pe_llm")
# A restarted Triton should be seen within about a second: gRPC's default reconnect backoff
# grows to 120 s, which left the service NOT_SERVING ~10 s after an embedded Triton was back.
_CHANNEL_ARGS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                 ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000)]


class NoTritonAvailable(RuntimeError):
    pass


@dataclass
class TritonServerState:
    url: str
    client: object
    healthy: bool = False
    in_flight: int = 0
    last_error: str = ""


@dataclass
class TritonPool:
    urls: list[str]
    on_health_change: Callable[[bool], None] = lambda serving: None
    poll_s: float = 1.0
    servers: list[TritonServerState] = field(default_factory=list)

    def __post_init__(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.servers = [TritonServerState(u, grpcclient.InferenceServerClient(u, channel_args=_CHANNEL_ARGS))
                        for u in self.urls]
        self._task: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return any(s.healthy for s in self.servers)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self.servers:
            await server.client.close()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[TritonServerState]:
        """The healthy server with the fewest requests in flight, held for one request."""
        candidates = [s for s in self.servers if s.healthy]
        if not candidates:
            raise NoTritonAvailable("no Triton server is ready: " + "; ".join(
                f"{s.url}: {s.last_error or 'not ready'}" for s in self.servers))
        server = min(candidates, key=lambda s: s.in_flight)
        server.in_flight += 1
        try:
            yield server
        finally:
            server.in_flight -= 1

    def mark_down(self, server: TritonServerState, reason: str) -> None:
        was = self.serving
        if server.healthy:
            log.warning("Triton %s marked down: %s", server.url, reason)
        server.healthy, server.last_error = False, reason
        if was != self.serving:
            self.on_health_change(self.serving)

    async def refresh(self) -> None:
        was = self.serving
        await asyncio.gather(*(self._check(s) for s in self.servers))
        if was != self.serving:
            self.on_health_change(self.serving)

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
