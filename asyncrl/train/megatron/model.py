"""The megatron-core GPTModel of an HF Qwen2/Llama checkpoint: build, load, gather, save.

Imports megatron.core at module level: import this module only after the backend has decided
to use megatron (asyncrl.train.megatron.rank does, when a MegatronBackend is constructed).

Choices, and why:
- The local layer spec (plain torch modules), not Transformer Engine's: it runs everywhere TE
  does not (CPU tests, a plain CUDA box), and its parameter names are the ones `convert` maps.
- fp32 parameters, like the torch backend, so the two agree to fp32 rounding.
- `parallel_output=False`: logits are gathered over the vocabulary before the log-softmax, so
  `asyncrl.models.forward.token_logprobs` (the one definition of a token logprob) applies as is.
  It costs [b, s, V] fp32 per micro-batch on every TP rank; a vocab-parallel logprob would
  avoid that and is the next optimisation for large vocabularies.
- Weights are read tensor by tensor from the checkpoint's safetensors files, and each rank
  keeps only its own shard, so no rank ever materialises the whole HF model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import safe_open
from safetensors.torch import save_file

from asyncrl.train.megatron import convert
from asyncrl.train.megatron.convert import ModelShape, ParamSpec

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Megatron-LM pads the vocabulary to a multiple of 128 per TP rank on GPUs (tensor-core
# friendly GEMM shapes); on CPU the smallest padding keeps the tests' shapes exact.
GPU_VOCAB_MULTIPLE = 128


def build_gpt(shape: ModelShape, *, padded_vocab: int, device: torch.device) -> GPTModel:
    """This rank's part of the model (its TP shard of its pipeline stage), uninitialised:
    `load_hf` fills every parameter."""
    config = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.intermediate_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, perform_initialization=False,
        use_cpu_initialization=device.type == "cpu",
        # Fused kernels are CUDA/apex-only; the unfused paths are the same maths.
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded_vocab,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=False, share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope", rotary_base=shape.rope_theta,
        rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
    )
    return model.to(device)


class HFCheckpoint:
    """Named tensors of an HF model directory (single or sharded safetensors), read lazily."""

    def __init__(self, path: Path) -> None:
        if (path / INDEX_FILE).exists():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        elif (path / WEIGHTS_FILE).exists():
            with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), WEIGHTS_FILE)
        else:
            raise FileNotFoundError(
                f"{path} has no {WEIGHTS_FILE} or {INDEX_FILE}: the megatron backend reads "
                "safetensors checkpoints (save the model with safe_serialization=True)")
        self._path, self._map = path, weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise KeyError(f"{name} is missing from the checkpoint in {self._path}")
        with safe_open(self._path / self._map[name], framework="pt") as f:
            return f.get_tensor(name).float()


def stage_specs(shape: ModelShape) -> list[tuple[ParamSpec, str]]:
    """(spec, local parameter name) of every parameter this rank's pipeline stage holds."""
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    return [(spec, convert.local_name(spec, shape, pp_rank, pp))
            for spec in convert.param_specs(shape, pp_size=pp)
            if convert.on_stage(spec, shape, pp_rank, pp)]


@torch.no_grad()
def load_hf(model: GPTModel, shape: ModelShape, checkpoint: HFCheckpoint, padded_vocab: int):
    """Copy this rank's shard of every HF tensor into `model`; every parameter must be set."""
    params = dict(model.named_parameters())
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    loaded = set()
    for spec, name in stage_specs(shape):
        shard = convert.to_megatron(spec, [checkpoint.get(n) for n in spec.hf], shape,
                                    tp_rank=tp_rank, tp_size=tp, padded_vocab=padded_vocab)
        if params[name].shape != shard.shape:
            raise ValueError(f"{name}: checkpoint gives {tuple(shard.shape)}, the model "
                             f"expects {tuple(params[name].shape)}")
        params[name].copy_(shard)
        loaded.add(name)
    if missing := set(params) - loaded:
        raise ValueError(f"parameters with no HF source (a conversion gap): {sorted(missing)}")


@torch.no_grad()
def gather_hf(param: torch.Tensor, spec: ParamSpec, shape: ModelShape) -> list[torch.Tensor]:
    """The full HF tensors of one parameter, gathered over the TP group (a collective)."""
    local, tp = param.detach(), ps.get_tensor_model_parallel_world_size()
    if spec.sharded and tp > 1:
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    else:
        shards = [local]
    return convert.to_hf(spec, shards, shape)


def gathered_hf(model: GPTModel, shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of this stage, layer by layer, gathered over its TP group (a
    collective: every rank of the group must iterate to the end). Tied aliases excluded."""
    params = dict(model.named_parameters())
    for spec, name in stage_specs(shape):
        if not spec.duplicate:
            yield from zip(spec.hf, gather_hf(params[name], spec, shape), strict=True)


def save_hf(weights: dict[str, torch.Tensor], config_source: str, path: Path) -> None:
    """An HF model directory (`config.json` + `model.safetensors`) that
    `AutoModelForCausalLM.from_pretrained` and this backend's `load` both read."""
    from transformers import AutoConfig

    path.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(config_source).save_pretrained(path)
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, path / WEIGHTS_FILE,
              metadata={"format": "pt"})


class HFLogits:
    """Calls a GPTModel the way `asyncrl.models.forward.token_logprobs` calls an HF model, so
    both backends share one definition of a token's logprob.

    Megatron's RoPE numbers positions 0..s-1 in every row, which equals the HF positions
    (`position_ids_from_mask`) exactly when rows are right-padded, as `TrainBatch` builds them;
    anything else is refused rather than silently mis-positioned.
    """

    def __init__(self, model: GPTModel, vocab_size: int) -> None:
        self.model, self.vocab_size = model, vocab_size

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        check_right_padded(attention_mask)
        logits = self.model(input_ids, position_ids, causal_mask(input_ids))
        return SimpleNamespace(logits=logits[..., : self.vocab_size])


def causal_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked. Passed explicitly because megatron's default mask is
    built on "cuda". Causal alone is exact for right-padded rows: real tokens never see the
    padding after them. (Logprobs *at* padding positions differ from HF's, which gives padding
    other positions; they are never trained or compared.)"""
    s = input_ids.shape[1]
    return torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu(1)[None, None]


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Megatron's RoPE numbers positions 0..s-1 in every row: refuse rows where padding comes
    before a real token, rather than mis-position them."""
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("the megatron backend needs right-padded rows (a real token "
                         "follows padding); TrainBatch.from_groups builds them so")
