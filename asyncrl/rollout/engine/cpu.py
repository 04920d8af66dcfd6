"""CpuEngine: real generation on plain PyTorch + an HF causal LM, with a KV cache.

One background task runs the decode loop over a single left-padded batch of rows (one row per
sample). Requests that arrive while it decodes join at the next step boundary: their contexts
are prefilled on their own and merged into the running cache (continuous batching). Finished
and aborted rows leave the batch at step boundaries.

Weights change only between decoding steps. The cache of in-flight rows was computed by the
old weights, so after an update every row is re-prefilled (prompt + tokens so far) under the
new ones: each later token's logprob is then exactly the new policy's, and tokens carry the
version that produced them.

Logprobs are of softmax(logits / temperature) before top-p/top-k filtering (which only shapes
sampling), computed in fp32 with positions from the attention mask, as in
`asyncrl.models.forward.token_logprobs`, which the trainer uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from asyncrl.models.forward import position_ids_from_mask
from asyncrl.types import FinishReason, Sample, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Request:
    samples: list[Sample]
    params: SamplingParams
    done: asyncio.Future
    open: int = field(init=False)

    def __post_init__(self) -> None:
        self.open = len(self.samples)

    def finish_one(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(self.samples)


@dataclass
class _Row:
    sample: Sample
    request: _Request


class CpuEngine:
    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        max_batch_size: int = 256,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        self._device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self._device).eval().requires_grad_(False)
        eos = self.model.config.eos_token_id
        self._eos = {eos} if isinstance(eos, int) else set(eos or [])
        self._pad = self.model.config.pad_token_id or 0
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._max_batch = max_batch_size
        self._version = 0
        self._queue: list[_Row] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [R, S] bool, left-padded
        self._logits: torch.Tensor | None = None  # [R, V] next-token logits
        self._aborted: set[str] = set()
        self._stale_cache = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    @property
    def policy_version(self) -> int:
        return self._version

    # --- protocol ----------------------------------------------------------------------------
    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        request = _Request(samples, params, asyncio.get_running_loop().create_future())
        for s in samples:
            if s.remaining_tokens <= 0 or s.is_finished:
                s.finish_reason = s.finish_reason if s.is_finished else FinishReason.LENGTH
                request.finish_one()
            else:
                s.finish_reason = None
                self._queue.append(_Row(s, request))
        if not samples:
            request.done.set_result(samples)
        self._ensure_loop()
        self._wake.set()
        return await request.done

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        if sample_ids is None:
            self._aborted.update(r.sample.sample_id for r in (*self._rows, *self._queue))
        else:
            self._aborted.update(sample_ids)
        self._wake.set()

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> None:
        # Runs between decoding steps: the loop yields to the event loop only there.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"update_weights: the model has no parameter {name!r}")
                params[name].copy_(tensor.to(self._device))
        self._version = policy_version
        self._stale_cache = bool(self._rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine decodes with (to check a sync bit for bit)."""
        return {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items()}

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    # --- the decode loop ---------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            self._loop_task.add_done_callback(self._on_loop_exit)

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("decode loop failed", exc_info=task.exception())
        for row in (*self._rows, *self._queue):  # fail every waiter instead of hanging it
            if not row.request.done.done():
                row.request.done.set_exception(task.exception())
        self._rows, self._queue, self._cache = [], [], None

    async def _run(self) -> None:
        while True:
            if not self._rows and not self._queue:
                self._wake.clear()
                await self._wake.wait()
            self._drop_aborted()
            if self._stale_cache:
                self._prefill_all()
            self._admit()
            if self._rows:
                self._step()
            await asyncio.sleep(0)  # let generate/abort/update_weights in between steps

    def _drop_aborted(self) -> None:
        if not self._aborted:
            return
        for row in [r for r in self._queue if r.sample.sample_id in self._aborted]:
            self._queue.remove(row)
            self._finish(row, FinishReason.ABORT)
        keep = [i for i, r in enumerate(self._rows) if r.sample.sample_id not in self._aborted]
        for i in set(range(len(self._rows))) - set(keep):
            self._finish(self._rows[i], FinishReason.ABORT)
        self._keep_rows(keep)
        self._aborted.clear()

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        row.sample.finish_reason = reason
        row.request.finish_one()

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = self._mask = self._logits = None
            return
        index = torch.tensor(keep, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask, self._logits = self._mask[index], self._logits[index]

    def _admit(self) -> None:
        room = self._max_batch - len(self._rows)
        if not self._queue or room <= 0:
            return
        new, self._queue = self._queue[:room], self._queue[room:]
        cache, mask, logits = self._prefill([r.sample for r in new])
        if self._rows:
            cache, mask = _merge(self._cache, self._mask, cache, mask)
            logits = torch.cat([self._logits, logits])
        self._rows += new
        self._cache, self._mask, self._logits = cache, mask, logits

    def _prefill_all(self) -> None:
        self._cache, self._mask, self._logits = self._prefill([r.sample for r in self._rows])
        self._stale_cache = False

    @torch.no_grad()
    def _prefill(self, samples: list[Sample]):
        contexts = [s.prompt_ids + s.response_ids for s in samples]
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.bool)
        for i, ctx in enumerate(contexts):
            ids[i, width - len(ctx) :] = torch.tensor(ctx)
            mask[i, width - len(ctx) :] = True
        ids, mask = ids.to(self._device), mask.to(self._device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask.long(),
                         position_ids=position_ids_from_mask(mask), past_key_values=cache,
                         use_cache=True)
        return out.past_key_values, mask, out.logits[:, -1].float()

    @torch.no_grad()
    def _step(self) -> None:
        params = [r.request.params for r in self._rows]
        tokens, logprobs = _sample(self._logits, params, self._generator)
        keep, next_ids = [], []
        for i, (row, tok, lp) in enumerate(zip(self._rows, tokens.tolist(), logprobs.tolist(),
                                               strict=True)):
            row.sample.append(tok, lp, self._version)
            if tok in self._eos:
                self._finish(row, FinishReason.STOP)
            elif row.sample.remaining_tokens <= 0:
                self._finish(row, FinishReason.LENGTH)
            else:
                keep.append(i)
                next_ids.append(tok)
        self._keep_rows(keep)
        if not self._rows:
            return
        positions = self._mask.sum(-1, keepdim=True)  # the new token's position
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(keep), 1)], dim=1)
        out = self.model(
            input_ids=torch.tensor(next_ids, device=self._device)[:, None],
            attention_mask=self._mask.long(), position_ids=positions,
            past_key_values=self._cache, use_cache=True,
        )
        self._cache, self._logits = out.past_key_values, out.logits[:, -1].float()


def _merge(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
):
    """Stack two left-padded batches: left-pad the shorter one's keys/values and mask."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = [
        (torch.cat([pad(a.keys, 2), pad(b.keys, 2)]),
         torch.cat([pad(a.values, 2), pad(b.values, 2)]))
        for a, b in zip(cache_a.layers, cache_b.layers, strict=True)
    ]
    mask = torch.cat([pad(mask_a, 1), pad(mask_b, 1)])
    return DynamicCache(ddp_cache_data=layers), mask


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its logprob under softmax(logits / T) (T = 1 for greedy rows)."""
    greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = _top_k_top_p(scaled, params)
    sampled = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator)[:, 0]
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
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
