"""VllmWorkerExtension: methods vLLM mixes into each of its workers for `VllmEngine`.

vLLM runs the model in worker processes of its own; `AsyncLLM.collective_rpc("name", ...)` calls
a method of that name on every worker. Passing this class as `worker_extension_cls` adds the
methods below to vLLM's worker class, so this module must be importable in those processes: it
imports only torch at import time (vLLM itself is already loaded there) and nothing of asyncrl
beyond this file.

Weight transport: a gloo side channel, not the RPC payload. `collective_rpc` cannot carry
tensors (its serialiser refuses memoryviews), so the alternative is a `torch.save` byte string,
which crosses two process boundaries (engine front end -> EngineCore -> worker) as one message
holding the whole model, serialised and deserialised on the way: four copies and a peak of
several models' worth of memory. Over the side channel each tensor goes once, straight from the
front end (rank 0) into a buffer in the worker (ranks 1..N), with every broadcast issued before
any is waited on so they stream back to back; the RPC carries only names, shapes and dtypes.
It is also the shape the GPU path takes (a NCCL group instead of gloo). The group is built from
its own TCPStore + PrefixStore because vLLM owns torch.distributed's default group.

Weights are loaded with `model_runner.reload_weights`, vLLM's in-place, layer-by-layer reload
that re-runs each layer's post-load processing. The classic `model.load_weights` fails on CPU:
there the linear layers drop their `weight` for a prepacked oneDNN kernel after loading.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

GROUP_PREFIX = "asyncrl-vllm-weights"


def join_gloo_group(
    host: str, port: int, rank: int, world_size: int, timeout_s: float,
    store: dist.TCPStore | None = None,
) -> dist.ProcessGroup:
    """One member of a gloo group on its own store (rank 0 passes the store it hosts)."""
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, store), rank, world_size, timeout)


class VllmWorkerExtension:
    """Mixed into vLLM's worker class; every method runs in a worker process.

    Method names carry an `asyncrl_` prefix: vLLM refuses an extension whose names clash with
    the worker's own.
    """

    def asyncrl_join_weight_group(
        self, host: str, port: int, world_size: int, timeout_s: float
    ) -> int:
        """Join the front end's weight group as rank 1 + this worker's rank; returns that rank."""
        rank = 1 + self.rank
        self._asyncrl_group = join_gloo_group(host, port, rank, world_size, timeout_s)
        return rank

    def asyncrl_receive_weights(self, meta: list[tuple[str, list[int], str]]) -> int:
        """Receive the tensors named in `meta` (name, shape, dtype), in order, and load them.

        The whole set arrives before any is loaded, so a failing load never leaves the sender
        blocked mid-stream. Returns the number of tensors loaded.
        """
        group = self._asyncrl_group
        named, works = [], []
        for name, shape, dtype in meta:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            works.append(group.broadcast([tensor], dist.BroadcastOptions()))
            named.append((name, tensor))
        for work in works:
            work.wait()
        self.model_runner.reload_weights(weights_iterator=iter(named))
        return len(named)

    def asyncrl_unfiltered_logprobs(self) -> bool:
        """Make sampled-token logprobs those of softmax(logits / T) before top-k/top-p.

        vLLM's "processed_logprobs" mode reports the logprobs after temperature *and* top-k/top-p
        filtering (renormalised over the kept tokens); asyncrl's engines report the unfiltered
        ones, the distribution the trainer recomputes. This wraps the top-k/top-p sampler so
        the logprobs it returns are taken from its input (already divided by T, not yet
        filtered). Greedy rows never reach it: vLLM reports their unscaled logprobs, as the CPU
        engine does. Returns False where this vLLM build has no such sampler (nothing patched).
        """
        sampler = getattr(getattr(self, "model_runner", None), "sampler", None)
        topk_topp = getattr(sampler, "topk_topp_sampler", None)
        if topk_topp is None or getattr(topk_topp, "_asyncrl_unfiltered", False):
            return topk_topp is not None
        filtered_forward = topk_topp.forward
        topk_topp.logprobs_mode = "raw_logprobs"  # the inner call needs not compute its own

        def forward(logits, generators, k, p):
            logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)  # before in-place filters
            sampled, _ = filtered_forward(logits, generators, k, p)
            return sampled, logprobs

        topk_topp.forward = forward
        topk_topp._asyncrl_unfiltered = True
        return True
