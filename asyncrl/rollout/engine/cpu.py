"""CpuEngine: the `cpu` RolloutEngine, real generation on PyTorch + an HF causal LM.

Owns the decode loop, the KV cache, sampling and per-token logprobs/versions; not dispatch,
staleness or tokenization (the worker and the manager do those).

One background task decodes one left-padded batch (a row per sample, every row's next token in
the same column). Requests that arrive meanwhile join at the next step boundary (continuous
batching): each distinct context is prefilled once (the n samples of a prompt share it), and
the caches are left-padded to a common width and stacked. Finished and aborted rows leave at
step boundaries, with the columns that became padding in every row.

Weights change only between steps. The cache of in-flight rows holds the old weights' keys and
values, so after an update every row is re-prefilled (prompt + tokens so far): each later
token's logprob is the new policy's, and each token carries the version that produced it.
Logprobs are of softmax(logits / temperature) before top-p/top-k filtering, in fp32, positions
from the mask, as in `asyncrl.models.forward.token_logprobs` (the trainer's); greedy
(temperature 0) reports the unscaled distribution's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from asyncrl.models.forward import position_ids_from_mask
from asyncrl.rollout.engine import to_continue
from asyncrl.types import FinishReason, Sample, SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Request:
    """One `generate` call: its samples and the future its caller awaits."""

    samples: list[Sample]
    params: SamplingParams
    done: asyncio.Future
    open: int = 0  # samples not yet finished or aborted

    def finish_one(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(self.samples)


@dataclass(slots=True, eq=False)
class _Row:
    sample: Sample
    request: _Request


@dataclass(slots=True)
class _Batch:
    """The rows decoding together, left-padded, with their cache and next-token logits."""

    rows: list[_Row]
    cache: DynamicCache  # per layer keys/values [B, H, S, D]
    mask: torch.Tensor  # [B, S] bool, True for real tokens
    logits: torch.Tensor  # [B, V] float32, each row's next-token logits

    def select(self, keep: list[int]) -> None:
        """Keep these rows (in this order); drop columns left as padding in all of them."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.logits = self.mask[index], self.logits[index]
        # Attention cost follows the width; positions come from the mask, so cutting all-padding
        # columns (a long row just left) changes no result.
        start = int(self.mask.any(0).int().argmax())
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def extend(self, other: _Batch) -> None:
        """Stack `other` below: left-pad the narrower one's keys, values and mask."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)])
            a.values = torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows


class CpuEngine:
    """A `RolloutEngine` on plain PyTorch (CPU, or any torch device) with continuous batching.

    Args:
        model_path: an HF causal-LM directory (full-attention decoder, e.g. Qwen2 or Llama).
        eos_token_id: the token that ends a sample; default: every EOS id of the model's config
            and generation config.
        pad_token_id: filler for left padding (never attended to); default from the config.
        seed: seeds sampling. Each token's draw depends only on (seed, sample id, position), not
            on which rows share the batch or when a request arrived, so a run repeats exactly
            (and a resumed sample continues as it would have) whatever the timing.
        max_batch_size: rows decoded together; further samples wait in a queue.
        dtype: torch dtype name of the weights ("float32" for logprobs that match the trainer).
        device: torch device of the model and cache.
    """

    def __init__(
        self,
        model_path: str,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
        max_batch_size: int = 256,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"CpuEngine: dtype {dtype!r} is not a torch dtype; use 'float32'")
        if max_batch_size < 1:
            raise ValueError(f"CpuEngine: max_batch_size must be >= 1 (got {max_batch_size})")
        self._device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.model.to(self._device).eval().requires_grad_(False)
        _require_full_attention(self.model.config, model_path)
        self._eos, self._pad = _special_ids(self.model, eos_token_id, pad_token_id)
        if not self._eos:
            log.warning("CpuEngine: %s names no EOS token; samples end at max_new_tokens only",
                        model_path)
        # Tied weights appear under several names (lm_head.weight and embed_tokens.weight).
        self._weights = self.model.state_dict(keep_vars=True)
        self._seed = seed
        self._max_batch = max_batch_size
        self._version = 0
        self._queue: list[_Row] = []
        self._batch: _Batch | None = None
        self._stale = False  # the batch's cache was computed by weights older than the model's
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self._compute_s = 0.0

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def compute_seconds(self) -> float:
        return self._compute_s

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        if self._closed:
            raise RuntimeError("CpuEngine.generate: the engine is closed")
        todo = to_continue("CpuEngine", samples, params)
        request = _Request(samples, params, asyncio.get_running_loop().create_future())
        for s in todo:
            s.finish_reason = None
            request.open += 1
            self._queue.append(_Row(s, request))
        if request.open == 0:
            return samples
        self._ensure_loop()
        self._wake.set()
        try:
            return await request.done
        except asyncio.CancelledError:  # the caller gave up: stop decoding its rows
            self._drop(lambda row: row.request is request)
            raise

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        # Only samples in flight now are affected: an id is not remembered, so a later resume
        # of the same sample is not aborted by mistake.
        ids = None if sample_ids is None else set(sample_ids)
        self._drop(lambda row: ids is None or row.sample.sample_id in ids)

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> None:
        # No await below: the decode loop stays parked at a step boundary during the copy.
        updates = dict(named_tensors)
        self._check_weights(updates)  # before any copy: a bad update leaves the old policy whole
        with torch.no_grad():
            for name, tensor in updates.items():
                self._weights[name].copy_(tensor)
        self._version = policy_version
        self._stale = self._batch is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine decodes with (to check a sync bit for bit)."""
        return {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items()}

    async def close(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.abort()  # nobody waits forever: unfinished samples come back as partials

    # --- the decode loop ---------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            self._loop_task.add_done_callback(self._on_loop_exit)

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("CpuEngine: decode loop failed", exc_info=task.exception())
        rows = self._queue + (self._batch.rows if self._batch else [])
        for row in rows:  # fail every waiter instead of leaving it hanging
            if not row.request.done.done():
                row.request.done.set_exception(task.exception())
        self._queue, self._batch = [], None

    async def _run(self) -> None:
        while True:
            if self._batch is None and not self._queue:
                self._wake.clear()
                await self._wake.wait()
            start = time.perf_counter()
            self._admit()
            if self._batch is not None:
                self._step()
            self._compute_s += time.perf_counter() - start
            await asyncio.sleep(0)  # the step boundary: generate/abort/update_weights run here

    def _drop(self, hit: Callable[[_Row], bool]) -> None:
        """Finish the queued and active rows `hit` selects as ABORT, keeping their tokens."""
        # Callers run on the event loop, where the decode loop only ever waits at a step
        # boundary: the batch is consistent and rows can leave at once.
        queued, self._queue = self._queue, []
        for row in queued:
            if hit(row):
                self._finish(row, FinishReason.ABORT)
            else:
                self._queue.append(row)
        if self._batch is not None:
            keep = []
            for i, row in enumerate(self._batch.rows):
                if hit(row):
                    self._finish(row, FinishReason.ABORT)
                else:
                    keep.append(i)
            self._keep_rows(keep)

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        row.sample.finish_reason = reason
        row.request.finish_one()

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._batch = None
        elif len(keep) < len(self._batch.rows):
            self._batch.select(keep)

    def _admit(self) -> None:
        """Prefill queued rows into the batch; after a weight update, re-prefill every row."""
        active = self._batch.rows if self._batch is not None else []
        room = max(self._max_batch - len(active), 0)
        new, self._queue = self._queue[:room], self._queue[room:]
        try:
            if self._stale and active:
                self._batch = self._prefill(active + new)
            elif new:
                fresh = self._prefill(new)
                if self._batch is None:
                    self._batch = fresh
                else:
                    self._batch.extend(fresh)
        except BaseException:  # back in the queue, so the loop's exit fails their waiters
            self._queue = new + self._queue
            raise
        self._stale = False

    @torch.no_grad()
    def _prefill(self, rows: list[_Row]) -> _Batch:
        contexts = [tuple(r.sample.prompt_ids + r.sample.response_ids) for r in rows]
        unique: dict[tuple[int, ...], int] = {}
        index = [unique.setdefault(ctx, len(unique)) for ctx in contexts]
        width = max(map(len, unique))
        ids = torch.full((len(unique), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.bool)
        for i, ctx in enumerate(unique):
            ids[i, width - len(ctx) :] = torch.tensor(ctx)
            mask[i, width - len(ctx) :] = True
        ids, mask = ids.to(self._device), mask.to(self._device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask.long(),
                         position_ids=position_ids_from_mask(mask), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if len(unique) < len(rows):  # copy each shared context's cache to all its rows
            expand = torch.tensor(index, device=self._device)
            cache.batch_select_indices(expand)
            mask, logits = mask[expand], logits[expand]
        return _Batch(rows, cache, mask, logits)

    @torch.no_grad()
    def _step(self) -> None:
        """Sample one token per row, retire finished rows, run the next forward on the rest."""
        batch = self._batch
        uniforms = [_uniform(self._seed, r.sample.sample_id, len(r.sample.response_ids))
                    for r in batch.rows]
        logits = batch.logits
        short = [i for i, r in enumerate(batch.rows)
                 if len(r.sample.response_ids) < r.sample.min_new_tokens]
        if short and self._eos:  # EOS masked until min_new_tokens (logprobs of that distribution)
            logits = logits.clone()
            eos = torch.tensor(sorted(self._eos))
            logits[torch.tensor(short)[:, None], eos[None, :]] = -torch.inf
        tokens, logprobs = _sample(logits, [r.request.params for r in batch.rows],
                                   torch.tensor(uniforms, device=batch.logits.device))
        keep = []
        for i, (row, tok, lp) in enumerate(zip(batch.rows, tokens.tolist(), logprobs.tolist(),
                                               strict=True)):
            row.sample.append(tok, lp, self._version)
            if tok in self._eos:
                self._finish(row, FinishReason.STOP)
            elif row.sample.remaining_tokens <= 0:
                self._finish(row, FinishReason.LENGTH)
            else:
                keep.append(i)
        self._keep_rows(keep)
        if self._batch is None:
            return
        positions = batch.mask.sum(-1, keepdim=True)  # real tokens before the new one
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)
        out = self.model(input_ids=tokens[keep][:, None], attention_mask=batch.mask.long(),
                         position_ids=positions, past_key_values=batch.cache, use_cache=True)
        batch.logits = out.logits[:, -1].float()

    def _check_weights(self, updates: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(updates) - set(self._weights))
        if unknown:
            raise ValueError(
                f"update_weights: the model has no weight named {unknown[:3]} ({len(unknown)} "
                f"unknown); send HF names as in the model's state_dict, e.g. "
                f"{next(iter(self._weights))!r}")
        missing = [n for n, t in self._weights.items() if n not in updates
                   and not any(a in updates for a, u in self._weights.items() if u is t)]
        if missing:
            raise ValueError(f"update_weights: {len(missing)} weights missing, e.g. "
                             f"{missing[:3]}; send the full state dict (a partial update would "
                             f"mix two policies)")
        for name, tensor in updates.items():
            if tensor.shape != self._weights[name].shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(self._weights[name].shape)}")


def _uniform(seed: int, sample_id: str, position: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, sample, position): a keyed hash, not a stream."""
    digest = hashlib.blake2b(f"{seed}/{sample_id}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its logprob under softmax(logits / T) (T = 1 for greedy rows).

    Sampling is by inverse CDF: row i takes the first token whose cumulative probability
    exceeds uniforms[i] (an exact sampler; tokens filtered out have zero mass, so never win).

    Args:
        logits: [B, V] float32.
        uniforms: [B] float64 draws in [0, 1).
    Returns:
        tokens [B] int64 and logprobs [B] float32.
    """
    greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        filtered = _top_k_top_p(scaled, params)
        cdf = torch.softmax(filtered, dim=-1).double().cumsum(-1)
        target = (uniforms * cdf[:, -1])[:, None]
        sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[B, V] logits with the tokens outside each row's top-k / top-p set at -inf."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=scaled.device)
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    remove = ranks >= ks[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    remove |= before >= torch.tensor(top_p, device=scaled.device)[:, None]
    remove[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros (False) before `t` along `dim` up to `width`; F.pad lists dims last to first."""
    return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [width - t.shape[dim], 0])


def _special_ids(model, eos: int | None, pad: int | None) -> tuple[set[int], int]:
    """EOS ids (the given one, else every one of config and generation config) and pad id."""
    generation = getattr(model, "generation_config", None)
    eos_ids = {eos} if eos is not None else set()
    if eos is None:
        for ids in (model.config.eos_token_id, getattr(generation, "eos_token_id", None)):
            eos_ids.update([ids] if isinstance(ids, int) else ids or [])
    pads = (pad, model.config.pad_token_id, getattr(generation, "pad_token_id", None), *eos_ids)
    return eos_ids, next((p for p in pads if p is not None), 0)  # pad is never attended to


def _require_full_attention(config, model_path: str) -> None:
    # Left-padded merging and column trimming assume every layer attends to the whole context;
    # a sliding-window cache would need its own bookkeeping.
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(f"CpuEngine: {model_path} has layer types {sorted(kinds)}; "
                                  f"only full-attention decoders are supported")
