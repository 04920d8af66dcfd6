"""MegatronRank: one process's part of the SPMD megatron trainer.

Every rank of the trainer group calls the same methods with the same arguments in the same
order (they run collectives); `backend.MegatronBackend` makes rank 0 the controller-facing
object and replays each call on the other ranks. Data parallelism splits every minibatch's rows
into contiguous parts, one per data-parallel rank; the shares of `PolicyObjective.accumulate`
are of the whole minibatch, so gradients are **summed** over data-parallel ranks (not
averaged) and equal the single-process gradient. Tensor-parallel ranks of one replica see the
same rows and compute the same loss; megatron's layers exchange activations and gradients.

The optimizer is torch AdamW on the (sharded) parameters, as in the torch backend: Adam is
elementwise, so sharding changes nothing but the gradient-norm clip, whose norm is summed over
the model-parallel group with replicated parameters counted once (megatron's own rule).
With pipeline stages (`pipeline.StagePipeline`) the same objective runs GPipe-style across the
stages; the tied output-layer copy on the last stage is left out of the norm, like megatron.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoConfig

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.models.forward import token_logprobs
from asyncrl.train.megatron import convert
from asyncrl.train.megatron.cpu_shim import cpu_device_context
from asyncrl.train.megatron.model import (
    GPU_VOCAB_MULTIPLE,
    HFCheckpoint,
    HFLogits,
    build_gpt,
    check_right_padded,
    gathered_hf,
    load_hf,
    save_hf,
    stage_specs,
)
from asyncrl.train.megatron.pipeline import (
    StagePipeline,
    sum_tied_embedding_grads,
    weights_to_first_rank,
)
from asyncrl.train.objective import PolicyObjective, batched_logprobs, lr_factor
from asyncrl.types import TrainBatch

STATE_FILE, OPTIMIZER_DIR = "trainer_state.pt", "optimizer"
# Grads are all-reduced in flat buckets of this many bytes: few collectives, bounded extra memory.
_GRAD_BUCKET_BYTES = 64 << 20


class MegatronRank:
    """Expects torch.distributed and megatron's parallel state to be initialised (see
    backend.init_rank)."""

    def __init__(self, model_path: str, algorithm: AlgorithmConfig, trainer: TrainerConfig, *,
                 temperature: float, max_new_tokens: int, total_steps: int, seed: int) -> None:
        torch.manual_seed(seed)
        self._cfg, self._model_path = trainer, model_path
        self._temperature = temperature if temperature > 0 else 1.0
        self._device = torch.device(trainer.device)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.shape = convert.ModelShape.from_hf_config(AutoConfig.from_pretrained(model_path))
        self.shape.check_parallel(trainer.tensor_parallel_size, trainer.pipeline_parallel_size)
        self._tp_rank = ps.get_tensor_model_parallel_rank()
        self._dp_rank, self._dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._padded_vocab = self.shape.padded_vocab(
            trainer.tensor_parallel_size, 1 if self._device.type == "cpu" else GPU_VOCAB_MULTIPLE)
        self._objective = PolicyObjective(algorithm, max_new_tokens=max_new_tokens)
        checkpoint = HFCheckpoint(Path(model_path))
        with self._megatron():
            self.model = self._load_model(checkpoint).train()
            self._ref = (self._load_model(checkpoint).eval().requires_grad_(False)
                         if algorithm.kl_coef else None)
        specs = stage_specs(self.shape)
        self._sharded = {name: spec.sharded for spec, name in specs}
        self._duplicates = {name for spec, name in specs if spec.duplicate}
        self._pipeline = (StagePipeline(self.shape.hidden_size, self._device)
                          if trainer.pipeline_parallel_size > 1 else None)
        self._opt = torch.optim.AdamW(self.model.parameters(), lr=trainer.lr, betas=trainer.betas,
                                      weight_decay=trainer.weight_decay)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._opt, lr_factor(trainer.lr_schedule, total_steps=total_steps,
                                 warmup_steps=trainer.warmup_steps,
                                 min_ratio=trainer.min_lr_ratio))
        self.policy_version = 0

    def _megatron(self):
        """Context for running megatron code: the CPU shim on CPU, nothing on a GPU."""
        return cpu_device_context() if self._device.type == "cpu" else contextlib.nullcontext()

    def _load_model(self, checkpoint: HFCheckpoint):
        model = build_gpt(self.shape, padded_vocab=self._padded_vocab, device=self._device)
        load_hf(model, self.shape, checkpoint, self._padded_vocab)
        return model

    def _forward(self, model, mb: TrainBatch, *, with_entropy: bool = False):
        return token_logprobs(
            HFLogits(model, self.shape.vocab_size), mb.input_ids.to(self._device),
            mb.attention_mask.to(self._device), self._temperature, with_entropy=with_entropy)

    def _my_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's contiguous part of `rows`."""
        return rows.tensor_split(self._dp)[self._dp_rank]

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, model=None) -> torch.Tensor:
        """[B, T] float32 on CPU, identical on every rank."""
        check_right_padded(batch.attention_mask)
        model = model or self.model
        rows = self._my_rows(torch.arange(batch.size))
        with self._megatron():
            if self._pipeline is None:
                local = batched_logprobs(batch, rows, self._cfg.micro_batch_size,
                                         lambda mb: self._forward(model, mb))
            else:
                local = self._pipeline.logprobs(model, batch, rows, self._cfg.micro_batch_size,
                                                self._forward)
        if self._dp == 1:
            return local
        full = torch.zeros(batch.input_ids.shape, device=self._device)
        full[rows.to(self._device)] = local.to(self._device)
        dist.all_reduce(full, group=ps.get_data_parallel_group())
        return full.cpu()

    def step(self, batch: TrainBatch) -> dict[str, float]:
        check_right_padded(batch.attention_mask)
        old_logprobs = self.logprobs(batch)
        ref_logprobs = self.logprobs(batch, self._ref) if self._ref is not None else None
        tensors, metrics = self._objective.step_tensors(batch, old_logprobs, ref_logprobs)
        # tensor_split, not chunk: chunk can give fewer parts (6 rows into 4 → 3)
        for minibatch in torch.arange(batch.size).tensor_split(self._cfg.minibatches):
            metrics |= self._optimizer_step(batch, tensors, minibatch)
        return metrics

    def _optimizer_step(self, batch: TrainBatch, tensors, rows: torch.Tensor) -> dict[str, float]:
        self._opt.zero_grad(set_to_none=True)
        mine, size = self._my_rows(rows), self._cfg.micro_batch_size
        with self._megatron():
            if self._pipeline is None:
                sums = self._objective.accumulate(
                    batch, tensors, mine, micro_batch_size=size, minibatch_rows=rows,
                    forward=lambda mb, with_entropy: self._forward(self.model, mb,
                                                                   with_entropy=with_entropy))
            else:
                sums = self._pipeline.accumulate(
                    self.model, self._objective, batch, tensors, mine, micro_batch_size=size,
                    minibatch_rows=rows, forward=self._forward)
                if self.shape.tied:
                    sum_tied_embedding_grads(self.model)
        if self._dp > 1:
            self._sum_grads_over_data_parallel()
            sums = self._sum_metrics_over_data_parallel(sums)
        grad_norm = self._clip_grads(self._cfg.grad_clip)
        self._opt.step()
        self._scheduler.step()
        self.policy_version += 1
        return sums | {"train/grad_norm": grad_norm, "train/lr": self._scheduler.get_last_lr()[0]}

    def _sum_grads_over_data_parallel(self) -> None:
        group = ps.get_data_parallel_group()
        grads = []
        for p in self.model.parameters():
            if p.grad is None:  # a rank without rows this minibatch still joins the sum
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, grad in enumerate(grads):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= _GRAD_BUCKET_BYTES or i == len(grads) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=group)
                for g, reduced in zip(bucket, flat.split([g.numel() for g in bucket]),
                                      strict=True):
                    g.copy_(reduced.view_as(g))
                bucket, size = [], 0

    def _sum_metrics_over_data_parallel(self, sums: dict[str, float]) -> dict[str, float]:
        parts: list[dict[str, float]] = [{} for _ in range(self._dp)]
        dist.all_gather_object(parts, sums, group=ps.get_data_parallel_group_gloo())
        total: dict[str, float] = {}
        for part in parts:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return total

    @torch.no_grad()
    def _clip_grads(self, max_norm: float) -> float:
        """torch's clip_grad_norm_ rule on the global norm over every shard of the model."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        squares = torch.zeros((), device=self._device)
        for name, p in params:
            # Replicated parameters and the tied output-layer copy count once.
            if name not in self._duplicates and (self._sharded[name] or self._tp_rank == 0):
                squares += p.grad.float().pow(2).sum()
        if ps.get_model_parallel_group().size() > 1:
            dist.all_reduce(squares, group=ps.get_model_parallel_group())
        norm = squares.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's epsilon and clamp
        for _, p in params:
            p.grad.mul_(coef)
        return float(norm)

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors, layer by layer (tied aliases last, as HF has them). Every rank
        must iterate to the end; data-parallel replicas other than rank 0's yield nothing."""
        if self._dp_rank != 0:
            return
        seen: dict[str, torch.Tensor] = {}
        weights = (gathered_hf(self.model, self.shape) if self._pipeline is None
                   else weights_to_first_rank(self.model, self.shape, self._device))
        for name, tensor in weights:
            seen[name] = tensor
            yield name, tensor
        for alias, source in convert.tied_aliases(self.shape).items():
            if source in seen:  # on the rank that holds it
                yield alias, seen[source]

    def save(self, path: Path) -> None:
        """HF weights and the run state from rank 0, optimizer shards from data-parallel
        replica 0 (the other replicas hold the same state)."""
        is_rank0 = dist.get_rank() == 0
        weights = {}
        for name, tensor in self.hf_weights():  # every rank joins the gathers
            if is_rank0:
                weights[name] = tensor.cpu()
        if is_rank0:
            for alias in convert.tied_aliases(self.shape):
                weights.pop(alias)
            save_hf(weights, self._model_path, path)
            torch.save({"scheduler": self._scheduler.state_dict(),
                        "policy_version": self.policy_version,
                        "tensor_parallel_size": self._cfg.tensor_parallel_size,
                        "pipeline_parallel_size": self._cfg.pipeline_parallel_size},
                       path / STATE_FILE)
        if self._dp_rank == 0:
            (path / OPTIMIZER_DIR).mkdir(parents=True, exist_ok=True)
            torch.save(self._opt.state_dict(), self._optimizer_file(path))
        dist.barrier()

    def _optimizer_file(self, path: Path) -> Path:
        pp_rank = ps.get_pipeline_model_parallel_rank()
        return path / OPTIMIZER_DIR / f"tp{self._tp_rank}_pp{pp_rank}.pt"

    def load(self, path: Path) -> None:
        state = check_layout(path, self._cfg)
        load_hf(self.model, self.shape, HFCheckpoint(path), self._padded_vocab)
        self._opt.load_state_dict(torch.load(self._optimizer_file(path), weights_only=True))
        self._scheduler.load_state_dict(state["scheduler"])
        self.policy_version = state["policy_version"]


def check_layout(path: Path, trainer: TrainerConfig) -> dict:
    """The run state saved in `path`, if its TP/PP layout is this run's (the optimizer state
    is sharded by it); else a ValueError naming the field."""
    state = torch.load(path / STATE_FILE, weights_only=True)
    for field in ("tensor_parallel_size", "pipeline_parallel_size"):
        if state[field] != getattr(trainer, field):
            raise ValueError(
                f"checkpoint {path} was saved with trainer.{field}={state[field]}, this run "
                f"has {getattr(trainer, field)}: resume with the same trainer.{field} "
                "(optimizer state is sharded by it)")
    return state
