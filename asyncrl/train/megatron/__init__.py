"""The `megatron` trainer backend: megatron-core GPTModel with tensor/pipeline/data parallelism.

Importing this package imports neither megatron nor transformers: `convert` is pure tensor
maths, and `backend.MegatronBackend` imports megatron.core only when constructed, so the GPU
stack stays optional (STYLE §8.1 rule 10). The worker imports it only when
`trainer.backend == "megatron"`.

Modules:
    convert   HF ↔ Megatron parameter names and layouts (fused QKV with GQA groups, fused
              gate/up, vocab padding), per tensor-parallel shard; no megatron import.
    model     the GPTModel built from an HF config, HF weights in, gathered HF weights out.
    rank      `MegatronRank`: one process's part of the SPMD trainer (step, logprobs, save).
    pipeline  pipeline stages: micro-batches through the stages (GPipe), tied embeddings,
              weights gathered to rank 0.
    backend   `MegatronBackend`: the one object the controller sees; rank 0 of the group,
              starting and driving the other ranks.
    cpu_shim  a CPU stand-in for the few `torch.cuda` calls megatron-core makes (tests only).
"""
