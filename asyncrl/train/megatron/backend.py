"""MegatronBackend: the megatron trainer as one `TrainerBackend` object, whatever its size.

The controller sees one object (step / logprobs / named_weights / save / load), like the torch
backend, and rank 0 alone broadcasts weights. A group of `tensor × pipeline × data` parallel
ranks runs behind it, SPMD:

    controller ──► MegatronBackend (rank 0, this process) ──pipe──► follower rank 1..N-1
                          │  MegatronRank                            MegatronRank
                          └────── torch.distributed default group (gloo | nccl) ──────┘

Rank 0 starts the followers itself (multiprocessing spawn, one per extra rank, on this node),
sends every call down a pipe to each, then runs its own part; all parts meet in megatron's
collectives. Pipes, not a collective, carry the calls: a follower may wait for its next call
as long as the controller likes (while rollouts run) without any collective timing out, and
when rank 0's process dies the pipe closes and the follower exits. A follower that fails
sends its traceback up its pipe and exits; its peers' collectives then fail fast (the peer's
sockets close), rank 0 raises its own error with the follower's traceback attached as a note
(or `TrainerRankFailed` if its own part went through), and the group is closed: ranks that
failed part-way are out of step. Bad input is refused on rank 0 before any rank starts, so
it leaves the group usable.

Single node only: followers are local processes (one GPU each on CUDA: rank r uses cuda:r of
the devices this process may see, so the trainer's Ray actor must reserve world-size GPUs).
Spanning nodes would make each rank its own Ray actor behind the same object.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.errors import AsyncrlError
from asyncrl.types import TrainBatch

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
# Longest any collective may wait for a peer. Generous: a peer may be loading a large
# checkpoint or running a long step, and a dead peer on gloo fails faster than this anyway.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long rank 0 waits for the followers' replies after its own part failed (they may be
# stuck in a collective rank 0 never joined): then they are terminated.
_REPLY_AFTER_FAILURE_S = 60.0


class TrainerRankFailed(AsyncrlError):
    """A rank of the megatron trainer group failed; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, kwargs: dict[str, Any]):
    """Join the trainer's process group, set megatron's parallel state, build this rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from asyncrl.train.megatron.cpu_shim import init_cpu_rng_tracker
    from asyncrl.train.megatron.rank import MegatronRank

    trainer: TrainerConfig = kwargs["trainer"]
    cuda = torch.device(trainer.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{LOOPBACK}:{port}",
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    ps.initialize_model_parallel(trainer.tensor_parallel_size, trainer.pipeline_parallel_size,
                                 distributed_timeout_minutes=COLLECTIVE_TIMEOUT.seconds // 60)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(kwargs["seed"])
    else:
        init_cpu_rng_tracker()
    return MegatronRank(**kwargs)


def shutdown_rank() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _follow(rank: int, world_size: int, port: int, kwargs: dict[str, Any], conn,
            num_threads: int) -> None:
    """A follower's whole life: build its rank, then run each call rank 0 sends, in order."""
    torch.set_num_threads(num_threads)
    try:
        me = init_rank(rank, world_size, port, kwargs)
        conn.send(("ok", None))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # rank 0 is gone
                return
            if method == "close":
                conn.send(("ok", None))
                return
            result = getattr(me, method)(*args)
            if method == "hf_weights":
                for _ in result:
                    pass
            conn.send(("ok", None))
    except Exception:  # reported to rank 0, which raises it; this process then exits
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        shutdown_rank()


def _check_batch(batch: TrainBatch) -> None:
    """Refuse a bad batch on rank 0, before any rank starts: a failure inside the group closes
    it, a refused batch leaves it usable."""
    from asyncrl.train.megatron.model import check_right_padded

    check_right_padded(batch.attention_mask)


class MegatronBackend:
    """`TrainerBackend` on megatron-core; see the module docstring for the process layout.

    Only one can live in a process at a time (megatron's parallel state is global): `close()`
    it before building another.
    """

    def __init__(self, model_path: str, algorithm: AlgorithmConfig, trainer: TrainerConfig, *,
                 temperature: float, max_new_tokens: int, total_steps: int, seed: int) -> None:
        if importlib.util.find_spec("megatron") is None:
            raise ImportError("trainer.backend=megatron needs megatron-core: pip install "
                              "'asyncrl[megatron]', or set trainer.backend=torch")
        from transformers import AutoConfig

        from asyncrl.train.megatron.convert import ModelShape

        # Refuse an impossible split here, before any process starts.
        ModelShape.from_hf_config(AutoConfig.from_pretrained(model_path)).check_parallel(
            trainer.tensor_parallel_size, trainer.pipeline_parallel_size)
        world = (trainer.tensor_parallel_size * trainer.pipeline_parallel_size
                 * trainer.data_parallel_size)
        if torch.device(trainer.device).type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(
                f"trainer.backend=megatron needs one GPU per rank: tensor × pipeline × data "
                f"parallel sizes = {world}, but {torch.cuda.device_count()} GPU(s) are visible"
                ": lower trainer.data_parallel_size or trainer.tensor_parallel_size")
        kwargs = dict(model_path=model_path, algorithm=algorithm, trainer=trainer,
                      temperature=temperature, max_new_tokens=max_new_tokens,
                      total_steps=total_steps, seed=seed)
        port = _free_port()
        ctx = mp.get_context("spawn")
        self._pipes, self._followers = [], []
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_follow, name=f"megatron-rank-{rank}", daemon=True,
                               args=(rank, world, port, kwargs, theirs, torch.get_num_threads()))
            proc.start()
            theirs.close()
            self._pipes.append(ours)
            self._followers.append(proc)
        self._closed, self._trainer = False, trainer
        try:
            self._rank = self._together("init", lambda: init_rank(0, world, port, kwargs),
                                        send=False)
        except BaseException:
            self.close(force=True)
            raise

    @property
    def policy_version(self) -> int:
        return self._rank.policy_version

    def _together(self, method: str, own, *args, send: bool = True):
        """Send `method(*args)` to every follower, run `own()` here, and collect the replies."""
        if self._closed:
            raise TrainerRankFailed("the megatron trainer group is closed")
        if send:
            for pipe in self._pipes:
                pipe.send((method, args))
        try:
            result = own()
        except Exception as own_error:
            # Raise rank 0's own error, with what the followers saw. If any of them failed or
            # hangs, the ranks are out of step: the group is closed.
            if failures := self._replies(timeout=_REPLY_AFTER_FAILURE_S):
                for failure in failures:
                    own_error.add_note(f"megatron trainer {failure}")
                self.close(force=True)
            raise
        if failures := self._replies(timeout=None):
            self.close(force=True)
            raise TrainerRankFailed(f"megatron {method} failed on a follower:\n{failures[0]}")
        return result

    def _replies(self, timeout: float | None) -> list[str]:
        """Tracebacks of followers that failed; a silent or dead follower counts as failed."""
        failures = []
        for rank, (pipe, proc) in enumerate(zip(self._pipes, self._followers, strict=True), 1):
            try:
                if timeout is not None and not pipe.poll(timeout):
                    failures.append(f"rank {rank} did not answer within {timeout} s")
                    continue
                status, detail = pipe.recv()
            except EOFError:
                failures.append(f"rank {rank} exited (exit code {proc.exitcode})")
                continue
            if status != "ok":
                failures.append(f"rank {rank}:\n{detail}")
        return failures

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        _check_batch(batch)
        return self._together("logprobs", lambda: self._rank.logprobs(batch), batch)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        _check_batch(batch)
        return self._together("step", lambda: self._rank.step(batch), batch)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors gathered over the tensor-parallel group, one at a time. A consumer
        that stops early still drains the rest, since the followers gather them all."""
        if self._closed:
            raise TrainerRankFailed("the megatron trainer group is closed")
        for pipe in self._pipes:
            pipe.send(("hf_weights", ()))
        weights = self._rank.hf_weights()
        failed: Exception | None = None

        def the_rest() -> None:
            if failed is not None:
                raise failed
            for _ in weights:
                pass

        try:
            yield from weights
        except Exception as error:
            failed = error
            raise
        finally:  # also when the consumer stops early: the followers gather everything
            self._together("hf_weights", the_rest, send=False)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._together("save", lambda: self._rank.save(path), path)

    def load(self, path: Path) -> None:
        from asyncrl.train.megatron.rank import check_layout

        check_layout(path, self._trainer)  # here, before any rank starts loading
        self._together("load", lambda: self._rank.load(path), path)

    def close(self, *, force: bool = False) -> None:
        """Stop the followers and leave the process group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not force:
            for pipe in self._pipes:
                with contextlib.suppress(OSError):  # already gone
                    pipe.send(("close", ()))
        for proc in self._followers:
            proc.join(timeout=5 if force else _REPLY_AFTER_FAILURE_S)
            if proc.is_alive():
                log.warning("terminating megatron trainer rank process %s", proc.pid)
                proc.terminate()
                proc.join()
        for pipe in self._pipes:
            pipe.close()
        shutdown_rank()
