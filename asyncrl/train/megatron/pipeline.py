"""Pipeline parallelism for MegatronRank: micro-batches through the stages, GPipe style.

Each stage holds `num_layers / P` layers (megatron-core builds them; the first stage also the
embeddings, the last the final norm and output layer). Activations travel as [s, b, h] tensors
between neighbouring ranks of a pipeline group (same TP rank, same data-parallel replica):
- forward: stage p receives from p-1 (`set_input_tensor`), runs its layers, sends to p+1; the
  last stage turns its logits into logprobs and, when training, into the share-weighted loss
  (`PolicyObjective.share_loss`, the same function the one-stage path uses);
- backward (training): all forwards first, then backwards in reverse order, each stage sending
  the gradient of its input back. GPipe keeps every micro-batch's activations alive until the
  backward; megatron's 1F1B schedule would bound that at P and is the next step for large
  micro-batch counts. Sends are blocking point-to-point ops in one fixed order on every rank,
  so the schedule cannot deadlock.
Shapes need no exchange: every rank derives each micro-batch's [width, rows] from the batch.

Tied embeddings: the last stage holds a copy of the word embeddings as its output layer. Their
gradients are summed over megatron's embedding group (first + last stage) before the optimizer
step, so both copies receive the same update and stay equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from asyncrl.models.forward import position_ids_from_mask
from asyncrl.train.megatron import convert
from asyncrl.train.megatron.model import causal_mask, gather_hf
from asyncrl.train.objective import PolicyObjective
from asyncrl.types import TrainBatch


def _inputs(mb: TrainBatch, device: torch.device):
    ids = mb.input_ids.to(device)
    return ids, position_ids_from_mask(mb.attention_mask.to(device)), causal_mask(ids)


class StagePipeline:
    """One rank's stage of a pipeline; every method is a collective over its pipeline group."""

    def __init__(self, hidden_size: int, device: torch.device) -> None:
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self._hidden, self._device = hidden_size, device
        self._group = ps.get_pipeline_model_parallel_group()
        self._last_rank = ps.get_pipeline_model_parallel_last_rank()

    def _recv(self, width: int, rows: int, src: int) -> torch.Tensor:
        x = torch.empty(width, rows, self._hidden, device=self._device)
        dist.recv(x, src=src)
        return x

    def _stage_forward(self, model, mb: TrainBatch, last_stage: Callable):
        """This stage's output for `mb`: `last_stage(mb)` on the last stage (via HFLogits),
        else the hidden states, sent on. Returns (input tensor or None, output)."""
        x = None
        if not self.first:
            x = self._recv(mb.input_ids.shape[1], mb.size,
                           ps.get_pipeline_model_parallel_prev_rank())
            x.requires_grad_(torch.is_grad_enabled())
        model.set_input_tensor(x)
        if self.last:
            return x, last_stage(mb)
        hidden = model(*_inputs(mb, self._device))
        dist.send(hidden.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return x, hidden

    @torch.no_grad()
    def logprobs(self, model, batch: TrainBatch, rows: torch.Tensor, micro_batch_size: int,
                 forward: Callable) -> torch.Tensor:
        """[len(rows), T] logprobs on every stage (computed on the last, then broadcast)."""
        out = torch.zeros(len(rows), batch.input_ids.shape[1], device=self._device)
        start = 0
        for mb_rows in rows.split(micro_batch_size):
            mb = batch.take(mb_rows)
            _, result = self._stage_forward(model, mb, lambda m: forward(model, m)[0])
            if self.last:
                out[start : start + len(mb_rows), : result.shape[1]] = result
            start += len(mb_rows)
        dist.broadcast(out, src=self._last_rank, group=self._group)
        return out.cpu()

    def accumulate(self, model, objective: PolicyObjective, batch: TrainBatch,
                   tensors: dict[str, torch.Tensor], rows: torch.Tensor, *,
                   micro_batch_size: int, minibatch_rows: torch.Tensor,
                   forward: Callable) -> dict[str, float]:
        """`PolicyObjective.accumulate` across the stages: gradients land on each stage's own
        parameters; the share-weighted metric sums (from the last stage) on every stage."""
        sums: dict[str, float] = {}

        def loss(mb_rows, share):
            def last_stage(mb):
                logprobs, entropy = forward(model, mb, with_entropy=objective.with_entropy)
                return objective.share_loss(batch, mb_rows, share, tensors, logprobs, entropy,
                                            sums)
            return last_stage

        saved = []
        for mb_rows, share in objective.micro_batches(batch, rows, micro_batch_size,
                                                      minibatch_rows):
            saved.append(self._stage_forward(model, batch.take(mb_rows), loss(mb_rows, share)))
        for x, out in reversed(saved):
            if self.last:
                out.backward()
            else:
                grad = self._recv(out.shape[0], out.shape[1],
                                  ps.get_pipeline_model_parallel_next_rank())
                torch.autograd.backward(out, grad)
            if x is not None:
                dist.send(x.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
        box = [sums]
        dist.broadcast_object_list(box, src=self._last_rank, group=self._group)
        return box[0]


def sum_tied_embedding_grads(model) -> None:
    """First stage's embedding grad + last stage's output-layer grad, on both (a collective
    over the embedding group; other ranks return at once)."""
    if not ps.is_rank_in_embedding_group():
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def weights_to_first_rank(model, shape: convert.ModelShape, device: torch.device):
    """Every full HF tensor of the model, yielded on its pipeline group's first rank (global
    rank 0 for replica 0); the other stages gather theirs over TP and send them there, in the
    order of `convert.param_specs`. A collective over the pipeline and TP groups."""
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    params = dict(model.named_parameters())
    for spec in convert.param_specs(shape, pp_size=pp):
        owner = next(p for p in range(pp) if convert.on_stage(spec, shape, p, pp))
        if spec.duplicate or (owner != pp_rank and (pp_rank != 0 or tp_rank != 0)):
            continue
        if owner == pp_rank:
            name = convert.local_name(spec, shape, pp_rank, pp)
            tensors = gather_hf(params[name], spec, shape)
            if pp_rank == 0:
                yield from zip(spec.hf, tensors, strict=True)
            elif tp_rank == 0:
                for tensor in tensors:
                    header = torch.tensor([tensor.dim(), *tensor.shape, *[0] * (2 - tensor.dim())],
                                          device=device)
                    dist.send(header, dst=ranks[0])
                    dist.send(tensor.contiguous(), dst=ranks[0])
            continue
        for name in spec.hf:  # pp_rank == 0, tp_rank == 0: receive another stage's tensors
            header = torch.empty(3, dtype=torch.long, device=device)
            dist.recv(header, src=ranks[owner])
            tensor = torch.empty(header[1 : 1 + int(header[0])].tolist(), device=device)
            dist.recv(tensor, src=ranks[owner])
            yield name, tensor
