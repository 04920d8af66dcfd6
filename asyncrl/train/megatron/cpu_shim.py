"""A CPU stand-in for the few `torch.cuda` calls megatron-core 0.16 makes on our path.

FOR TESTS AND CPU DEVELOPMENT ONLY; activated by the backend only when `trainer.device` is
"cpu", never on a GPU. megatron-core targets CUDA and has no CPU mode. On the path we use
(local layer spec, our own optimizer, our own micro-batch loop) it reaches CUDA in three places
(research/feasibility.md §4):
- `torch.cuda.current_device()` names the device of the RoPE frequencies and of the global
  attention-score buffer, and with pipeline stages and tied embeddings the model's constructor
  moves the output layer's copy with `Tensor.cuda()`; `cpu_device_context` makes the first
  answer "cpu" and the second a no-op, only while the backend runs megatron code, and
  restores both afterwards (nothing global lingers).
- the model-parallel RNG tracker wants CUDA generators; `init_cpu_rng_tracker` installs
  megatron's own inference tracker, whose `fork()` is a no-op. That is exact for us: dropout is
  0 and weights are loaded from the checkpoint, so no randomness flows through the tracker.
The causal attention mask is passed explicitly by the backend (megatron's default builds it
with `device="cuda"`), so no `device=` rewriting mode is needed. Re-check at each megatron
upgrade: these are private paths, not a supported CPU mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_device_context() -> Iterator[None]:
    """While inside, `torch.cuda.current_device()` returns the CPU device and
    `Tensor.cuda()` returns the tensor itself."""
    real_current = torch.cuda.current_device
    own_cuda = "cuda" in torch.Tensor.__dict__
    real_cuda = torch.Tensor.__dict__.get("cuda")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.cuda.current_device = real_current
        if own_cuda:
            torch.Tensor.cuda = real_cuda
        else:
            del torch.Tensor.cuda


def init_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
