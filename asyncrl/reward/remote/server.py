"""`RewardServer`: any `RewardFn` behind the gRPC service of reward.proto.

Serves `Score` (one answer) and `ScoreBatch` (many, scored concurrently), plus the standard
`grpc.health.v1.Health` service. Every RPC, health included, needs the metadata
`authorization: Bearer <token>`; a missing or wrong token is refused with UNAUTHENTICATED (the
comparison is constant-time). The server binds 127.0.0.1 unless told otherwise and never runs
without a token. A reward function that raises produces a FAILED result with the exception as its
reason, so the pipeline counts it; it is never sent as 0.

`asyncrl serve-reward` (asyncrl.cli.main) wraps this class; `serve_until_signal` runs it until
SIGTERM or SIGINT and then stops gracefully.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from asyncrl.errors import ConfigError
from asyncrl.reward import RewardFn
from asyncrl.reward.remote import reward_pb2 as pb
from asyncrl.reward.remote import reward_pb2_grpc as pb_grpc
from asyncrl.reward.remote._codec import prompt_from_wire, reward_to_wire
from asyncrl.types import Prompt, Reward, RewardStatus

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVICE_NAME = "asyncrl.reward.v1.RewardService"
# gRPC's default limit is 4 MiB; a batch of a few hundred long answers can pass it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# gRPC enables SO_REUSEPORT by default, which lets a second server bind a port already in use
# and silently share its traffic. A port in use must be an error instead.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
REFUSAL = "missing or wrong token: send metadata 'authorization: Bearer <token>'"


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


class _BearerToken(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details.invocation_metadata):
            return handler
        logger.warning("refused %s: %s", handler_call_details.method, REFUSAL)
        return _refusal(handler)

    def _authorized(self, metadata) -> bool:
        supplied = next((value for key, value in metadata or () if key == "authorization"), None)
        if supplied is None:
            return False
        if isinstance(supplied, str):
            supplied = supplied.encode()
        return hmac.compare_digest(supplied, self._expected)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield  # makes this an async generator, as streaming handlers must be

    codec = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)


class _RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, reward_fn: RewardFn, max_concurrency: int,
                 timeout_s: float | None) -> None:
        self._fn, self._timeout_s = reward_fn, timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)

    def _timed_out(self, seconds: float) -> Reward:
        return Reward.failed(f"timeout: no reward within {seconds}s (reward server timeout_s)",
                             RewardStatus.TIMEOUT)

    async def _score(self, prompt: Prompt, response: str) -> Reward:
        async with self._slots:
            try:
                reward = await asyncio.wait_for(self._fn.score(prompt, response), self._timeout_s)
            except TimeoutError:
                return self._timed_out(self._timeout_s)
            except Exception as exc:  # a crashing reward is this sample's typed failure, not 0
                logger.warning("reward raised on prompt %s: %r", prompt.prompt_id, exc)
                return Reward.failed(f"error: {type(exc).__name__}: {exc}")
        if not isinstance(reward, Reward):
            return Reward.failed(f"reward returned {reward!r}; expected a Reward")
        return reward

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResult:
        try:
            prompt = prompt_from_wire(request.prompt)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return reward_to_wire(await self._score(prompt, request.response))

    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context) -> pb.ScoreBatchResponse:
        try:
            prompts = [prompt_from_wire(p) for p in request.prompts]
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if any(item.prompt_index >= len(prompts) for item in request.items):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"an item's prompt_index is outside the {len(prompts)} prompts")
        pairs = [(prompts[item.prompt_index], item.response) for item in request.items]
        if getattr(self._fn, "score_batch", None) is not None:
            rewards = await self._score_batch(pairs)
        else:
            rewards = await asyncio.gather(*(self._score(p, r) for p, r in pairs))
        return pb.ScoreBatchResponse(results=[reward_to_wire(r) for r in rewards])

    async def _score_batch(self, pairs: list[tuple[Prompt, str]]) -> list[Reward]:
        """A reward with its own `score_batch(prompts, responses)` (e.g. a reward model)."""
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        timeout_s = None if self._timeout_s is None else self._timeout_s * len(pairs)
        async with self._slots:
            try:
                rewards = await asyncio.wait_for(self._fn.score_batch(prompts, responses),
                                                 timeout_s)
            except TimeoutError:
                return [self._timed_out(timeout_s)] * len(pairs)
            except Exception as exc:  # the whole batch fails as typed results, not as 0
                logger.warning("reward score_batch raised: %r", exc)
                return [Reward.failed(f"error: {type(exc).__name__}: {exc}")] * len(pairs)
        if len(rewards) != len(pairs) or not all(isinstance(r, Reward) for r in rewards):
            return [Reward.failed(f"reward score_batch returned {len(rewards)} items for "
                                  f"{len(pairs)} responses, or not Rewards")] * len(pairs)
        return list(rewards)


class RewardServer:
    """Serves one `RewardFn` over gRPC; `async with RewardServer(...) as server:` starts and stops.

    Args:
        reward_fn: any object with `async score(prompt, response) -> Reward`.
        token: the bearer token every RPC must carry (required, non-empty).
        host: the address to bind; loopback unless told otherwise.
        port: the TCP port; 0 picks a free one (read it from `port` after `start`).
        tls: (certificate PEM path, private key PEM path), or None for plaintext.
        max_concurrency: how many `score` calls may run at once over all RPCs.
        timeout_s: longest one reward may take before it fails with status TIMEOUT (a batch
            reward's `score_batch`: this times the batch size); None: no limit here, only the
            client's deadline.
    """

    def __init__(self, reward_fn: RewardFn, *, token: str, host: str = LOOPBACK, port: int = 0,
                 tls: tuple[str | Path, str | Path] | None = None,
                 max_concurrency: int = 64, timeout_s: float | None = None) -> None:
        if not token:
            raise ConfigError("RewardServer: token is empty; a reward server never runs "
                              "unauthenticated (pass the token the clients will send)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"RewardServer: port {port} is outside 0..65535")
        if max_concurrency < 1:
            raise ConfigError(f"RewardServer: max_concurrency must be >= 1, got {max_concurrency}")
        self._fn, self._token, self.host, self.port = reward_fn, token, host, port
        self._tls = None if tls is None else tuple(_read_pem(p) for p in tls)
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError(f"RewardServer: timeout_s must be > 0 or None, got {timeout_s}")
        self._max_concurrency, self._timeout_s = max_concurrency, timeout_s
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def tls(self) -> bool:
        return self._tls is not None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        server = grpc.aio.server(interceptors=[_BearerToken(self._token)], options=SERVER_OPTIONS)
        pb_grpc.add_RewardServiceServicer_to_server(
            _RewardServicer(self._fn, self._max_concurrency, self._timeout_s), server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        target = host_port(self.host, self.port)
        try:
            if self._tls is None:
                port = server.add_insecure_port(target)
            else:
                cert, key = self._tls
                port = server.add_secure_port(target, grpc.ssl_server_credentials([(key, cert)]))
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
            raise ConfigError(f"reward server: cannot bind {target} ({exc}); "
                              "is the port in use? choose another, or 0 for a free one") from None
        await server.start()
        self._server, self.port = server, port
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self._tls is None and not _is_loopback(self.host):
            logger.warning("serving on %s without TLS: the token travels in clear text; "
                           "pass a TLS certificate and key", self.address)
        logger.info("reward server on %s (%s)", self.address, "TLS" if self.tls else "plaintext")
        return port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, let RPCs in flight finish for up to `grace_s`, then stop."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> RewardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def _read_pem(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"reward server TLS: cannot read {path} ({exc.strerror})") from None


async def serve_until_signal(server: RewardServer, on_ready: Callable[[str], None],
                             grace_s: float = 5.0) -> None:
    """Start `server`, call `on_ready(address)`, serve until SIGTERM/SIGINT, stop gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    try:
        on_ready(server.address)
        await stopping.wait()
        logger.info("signal received; stopping the reward server")
    finally:
        await server.stop(grace_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
