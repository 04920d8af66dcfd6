"""`RemoteReward`: a `RewardFn` that scores on a `RewardServer` over gRPC.

Transport errors that a restart or an overload explains (UNAVAILABLE, DEADLINE_EXCEEDED) are
retried with exponential backoff and jitter, so a client outlives a server restart. When the
retries run out, the answer is `Reward.failed("remote: ...")`, counted by the pipeline like any
other reward failure; it never raises and never scores 0. A refused token is a configuration
error, not a transient one: it raises `RemoteRewardAuthError` at once, without retrying.

The gRPC channel is opened lazily in the running event loop (and reopened if the loop changes),
so a `RemoteReward` built in the driver can be pickled into a Ray actor; the token travels with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncrl.errors import AsyncrlError, ConfigError
from asyncrl.reward.remote import reward_pb2 as pb
from asyncrl.reward.remote import reward_pb2_grpc as pb_grpc
from asyncrl.reward.remote._codec import prompt_to_wire, reward_from_wire
from asyncrl.reward.remote.server import CHANNEL_OPTIONS, SERVICE_NAME, _is_loopback
from asyncrl.types import Prompt, Reward

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_BACKOFF_S = 10.0  # one wait between attempts never exceeds this, however many retries
# gRPC's own reconnect backoff grows to 120 s after a server goes away; cap it so that a restarted
# server is seen within one of our retry intervals.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                      ("grpc.min_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000))]


class RemoteRewardAuthError(ConfigError):
    """The reward server refused the token (UNAUTHENTICATED)."""


class RemoteRewardUnavailable(AsyncrlError):
    """The reward server did not answer a health check as SERVING."""


class _TransportFailure(Exception):
    """An RPC that failed for good; its message becomes the Reward's reason."""


class RemoteReward:
    """Scores on a remote reward server; implements the `RewardFn` protocol plus `score_batch`.

    Args:
        address: `host:port` of an `asyncrl serve-reward` server.
        token: the bearer token the server was started with.
        timeout_s: deadline of one RPC attempt (one `score`, or one whole `score_batch`).
        retries: attempts after the first on UNAVAILABLE / DEADLINE_EXCEEDED.
        backoff_s: wait before the first retry; doubled each retry (with jitter), capped at
            MAX_BACKOFF_S.
        tls_ca: PEM file of the CA (or self-signed certificate) that signed the server's
            certificate; None for a plaintext channel.
        token_source: how error messages name the token (e.g. "$REWARD_TOKEN (reward.token_env)").
    """

    def __init__(self, address: str, token: str, *, timeout_s: float = 30.0, retries: int = 5,
                 backoff_s: float = 0.5, tls_ca: str | Path | None = None,
                 token_source: str = "the token") -> None:
        if not token:
            raise ConfigError(f"remote reward {address}: {token_source} is empty; the server "
                              "refuses every RPC without its token")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ConfigError(f"remote reward {address}: need timeout_s > 0, retries >= 0 and "
                              f"backoff_s >= 0 (got {timeout_s}, {retries}, {backoff_s})")
        self.address, self.timeout_s, self.retries, self.backoff_s = (
            address, timeout_s, retries, backoff_s)
        self._token, self._token_source = token, token_source
        self._ca = _read_ca(tls_ca) if tls_ca is not None else None
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._ca is None and not _is_loopback(address.rpartition(":")[0]):
            logger.warning("remote reward %s without TLS: the token travels in clear text; "
                           "set tls_ca and serve with a certificate", address)

    @classmethod
    def from_config(cls, address: str, token_env: str, *, timeout_s: float = 30.0,
                    retries: int = 5, backoff_s: float = 0.5,
                    tls_ca: str | None = None) -> RemoteReward:
        """Build from `reward: {type: remote, address, token_env, ...}`; reads the token now."""
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ConfigError(
                f"reward.token_env: environment variable {token_env!r} is not set or empty; "
                "export the token the reward server was started with "
                f"(asyncrl serve-reward --token-env {token_env})")
        return cls(address, token, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                   tls_ca=tls_ca, token_source=f"the token in ${token_env} (reward.token_env)")

    def __repr__(self) -> str:  # never shows the token
        return (f"RemoteReward({self.address!r}, tls={self._ca is not None}, "
                f"timeout_s={self.timeout_s}, retries={self.retries})")

    def __getstate__(self) -> dict[str, Any]:  # a channel belongs to one process and loop
        return {**self.__dict__, "_channel": None, "_loop": None}

    async def score(self, prompt: Prompt, response: str) -> Reward:
        try:
            request = pb.ScoreRequest(prompt=prompt_to_wire(prompt), response=response)
        except TypeError as exc:
            return Reward.failed(f"remote: metadata of prompt {prompt.prompt_id!r} is not "
                                 f"JSON-serialisable ({exc})")
        try:
            reply = await self._call(pb_grpc.RewardServiceStub, "Score", request)
        except _TransportFailure as exc:
            return Reward.failed(str(exc))
        return reward_from_wire(reply, self.address)

    async def score_batch(self, prompts: Sequence[Prompt],
                          responses: Sequence[str]) -> list[Reward]:
        """Score `responses[i]` to `prompts[i]` in one RPC; the rewards come back in order.

        A prompt object shared by several responses (a group) is sent once. A transport failure
        fails every response with the same reason.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if not prompts:
            return []
        index: dict[int, int] = {}  # id(prompt) -> its position in request.prompts
        request = pb.ScoreBatchRequest()
        try:
            for prompt, response in zip(prompts, responses, strict=True):
                if id(prompt) not in index:
                    index[id(prompt)] = len(request.prompts)
                    request.prompts.append(prompt_to_wire(prompt))
                request.items.add(prompt_index=index[id(prompt)], response=response)
        except TypeError as exc:
            return [Reward.failed(f"remote: a prompt's metadata is not JSON-serialisable ({exc})")
                    ] * len(prompts)
        try:
            reply = await self._call(pb_grpc.RewardServiceStub, "ScoreBatch", request)
        except _TransportFailure as exc:
            return [Reward.failed(str(exc))] * len(prompts)
        if len(reply.results) != len(prompts):
            return [Reward.failed(f"remote: {self.address} answered {len(reply.results)} "
                                  f"results for {len(prompts)} responses")] * len(prompts)
        return [reward_from_wire(result, self.address) for result in reply.results]

    async def check(self) -> None:
        """Raise unless the server answers its health check as SERVING (retrying as RPCs do)."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            reply = await self._call(health_pb2_grpc.HealthStub, "Check", request)
        except _TransportFailure as exc:
            raise RemoteRewardUnavailable(str(exc)) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise RemoteRewardUnavailable(f"remote reward {self.address} is {name}")

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = self._loop = None

    def _open(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            options = [*CHANNEL_OPTIONS, *_RECONNECT_OPTIONS]
            if self._ca is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._ca)
                self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
            self._loop = loop
        return self._channel

    async def _call(self, stub_type: type, method: str, request: Any) -> Any:
        """One RPC with retries; raises _TransportFailure when it fails for good."""
        metadata = (("authorization", f"Bearer {self._token}"),)
        attempts = self.retries + 1
        for attempt in range(attempts):
            rpc = getattr(stub_type(self._open()), method)
            try:
                return await rpc(request, timeout=self.timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise RemoteRewardAuthError(
                    f"remote reward {self.address} refused {self._token_source} "
                    f"(UNAUTHENTICATED); use the token the server was started with")
            if code not in RETRYABLE:
                raise _TransportFailure(f"remote: {self.address} {method}: {code.name}: {details}")
            if attempt + 1 < attempts:
                delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1)
                logger.debug("remote reward %s %s: %s; retry %d/%d in %.2fs", self.address,
                             method, code.name, attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        hint = (f"each attempt exceeded timeout_s={self.timeout_s}; raise it or check the "
                "server's load" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                else "is the reward server running?")
        raise _TransportFailure(f"remote: {self.address} {method}: {code.name} on all {attempts} "
                                f"attempts ({details}); {hint}")


def _read_ca(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"remote reward tls_ca: cannot read {path} ({exc.strerror})") from None
