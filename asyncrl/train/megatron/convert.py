"""HF ↔ Megatron-core parameter names and layouts for Qwen2- and Llama-family causal LMs.

Pure tensor maths on plain tensors, no megatron import, so it is unit-tested on its own and
the weight broadcast (which always speaks HF names) never depends on megatron internals.

Layouts (megatron-core's local layer spec; T = tensor-parallel size, r = a TP rank):
- `linear_qkv` fuses q, k and v *per query group*: for each of the `ng` KV heads, its
  `nh / ng` query heads, then its key head, then its value head, each `head_dim` rows. TP
  splits dim 0 contiguously, so rank r holds whole groups `[r·ng/T, (r+1)·ng/T)` and `ng`
  must be a multiple of T. Qwen2's q/k/v biases follow the same layout.
- `linear_fc1` fuses gate and up *per TP rank*: rank r holds `cat(gate_r, up_r)` (SwiGLU
  splits its input in two halves, gate first), so the TP=1 layout is `cat(gate, up)` but the
  gathered TP=2 layout is `[gate_0, up_0, gate_1, up_1]`: never concatenate shards blindly.
- `linear_proj` / `linear_fc2` are row-parallel: split along dim 1 (their input).
- Word embeddings and the output layer are vocab-parallel: split along dim 0 after padding the
  vocabulary with zero rows to a multiple of T (megatron-core does not pad for us). Padded
  rows are never looked up and their logits are sliced off before the softmax, so they get
  zero gradient and stay zero under AdamW.
- Norm weights are replicated on every TP rank.
With tied embeddings and pipeline parallelism the last stage keeps its own copy of the word
embeddings as `output_layer.weight` (megatron-core's rule); it maps to the same HF tensor and
is marked `duplicate`, so it is loaded but never emitted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Kind = Literal["replicated", "vocab", "row", "qkv", "fc1"]
# Megatron's built-in llama3 rope scaling hard-codes these; other values cannot be expressed.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


class UnsupportedModel(ValueError):
    """The HF config describes a model the megatron backend cannot build faithfully."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the layouts depend on, read from an HF config (see `from_hf_config`)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    tied: bool
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Qwen2 (qkv bias) and Llama (no bias) configs; anything else raises.

        Raises:
            UnsupportedModel: another architecture, an MLP bias, or a rope scaling megatron-core
                cannot reproduce exactly.
        """
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {kind!r} is not supported by trainer.backend=megatron (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}): use trainer.backend=torch")
        if getattr(config, "mlp_bias", False) or getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel("megatron backend supports bias-free SwiGLU MLPs only: "
                                   "use trainer.backend=torch for this model")
        if kind == "llama" and getattr(config, "attention_bias", False):
            # Llama's attention_bias also biases o_proj; megatron biases only the fused QKV.
            raise UnsupportedModel("Llama with attention_bias (an o_proj bias) is not supported"
                                   " by trainer.backend=megatron: use trainer.backend=torch")
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModel("sliding-window attention is not supported by "
                                   "trainer.backend=megatron: use trainer.backend=torch")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        factor = None
        rope_type = rope.get("rope_type", "default")
        if rope_type == "llama3" and all(
                float(rope.get(k, -1)) == v for k, v in _MEGATRON_LLAMA3_ROPE.items()):
            factor = float(rope["factor"])
        elif rope_type != "default":
            raise UnsupportedModel(
                f"rope scaling {rope!r} cannot be reproduced by megatron-core's rope (only "
                f"'default' and 'llama3' with {_MEGATRON_LLAMA3_ROPE}): use trainer.backend=torch")
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
            qkv_bias=kind == "qwen2",
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            norm_eps=float(config.rms_norm_eps), rope_theta=theta, rope_scaling_factor=factor,
            max_position_embeddings=config.max_position_embeddings,
        )

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ValueError naming the config field when the model cannot be split so."""
        if self.num_kv_heads % tp:
            raise ValueError(
                f"trainer.tensor_parallel_size ({tp}) must divide the model's key/value heads "
                f"({self.num_kv_heads}): each TP rank holds whole query groups")
        if self.intermediate_size % tp:
            raise ValueError(f"trainer.tensor_parallel_size ({tp}) must divide the MLP width "
                             f"({self.intermediate_size})")
        if self.num_layers % pp:
            raise ValueError(f"trainer.pipeline_parallel_size ({pp}) must divide the model's "
                             f"layers ({self.num_layers})")

    def padded_vocab(self, tp: int, multiple: int = 1) -> int:
        """Vocabulary rounded up so each of `tp` shards has a multiple of `multiple` rows."""
        step = tp * multiple
        return -(-self.vocab_size // step) * step


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One megatron parameter: its global name, the HF tensors it is made of, its layout."""

    megatron: str
    """Name with the *global* layer index (see `local_name` for a pipeline stage's own)."""
    hf: tuple[str, ...]
    kind: Kind
    layer: int | None = None
    """Global layer index; None for embeddings, the final norm and the output layer."""
    stage: Literal["first", "last", "layer"] = "layer"
    duplicate: bool = False
    """A second copy of an HF tensor (tied output layer on the last pipeline stage)."""

    @property
    def sharded(self) -> bool:
        """Split across tensor-parallel ranks (else replicated on each)."""
        return self.kind != "replicated"


def param_specs(shape: ModelShape, *, pp_size: int = 1) -> list[ParamSpec]:
    """Every megatron parameter of the whole model, in HF state-dict order."""
    specs = [ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                       "vocab", stage="first")]
    for i in range(shape.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{h}self_attn.{p}_proj.weight" for p in "qkv")
        specs.append(ParamSpec(f"{m}self_attention.linear_qkv.weight", qkv, "qkv", i))
        if shape.qkv_bias:
            bias = tuple(f"{h}self_attn.{p}_proj.bias" for p in "qkv")
            specs.append(ParamSpec(f"{m}self_attention.linear_qkv.bias", bias, "qkv", i))
        specs += [
            ParamSpec(f"{m}self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",),
                      "row", i),
            ParamSpec(f"{m}mlp.linear_fc1.weight",
                      (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"), "fc1", i),
            ParamSpec(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), "row", i),
            ParamSpec(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",),
                      "replicated", i),
            ParamSpec(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",),
                      "replicated", i),
        ]
    specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",),
                           "replicated", stage="last"))
    if not shape.tied:
        specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), "vocab", stage="last"))
    elif pp_size > 1:
        specs.append(ParamSpec("output_layer.weight", ("model.embed_tokens.weight",), "vocab",
                               stage="last", duplicate=True))
    return specs


def tied_aliases(shape: ModelShape) -> dict[str, str]:
    """HF names that share a tensor with another (emitted by HF's state_dict, so by us too)."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if shape.tied else {}


def stage_layers(shape: ModelShape, pp_rank: int, pp_size: int) -> range:
    """Global indices of the layers a pipeline stage holds (an even split)."""
    per = shape.num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def on_stage(spec: ParamSpec, shape: ModelShape, pp_rank: int, pp_size: int) -> bool:
    if spec.stage == "first":
        return pp_rank == 0
    if spec.stage == "last":
        return pp_rank == pp_size - 1
    return spec.layer in stage_layers(shape, pp_rank, pp_size)


def local_name(spec: ParamSpec, shape: ModelShape, pp_rank: int, pp_size: int) -> str:
    """The name the parameter has inside one pipeline stage's GPTModel (local layer index)."""
    if spec.layer is None:
        return spec.megatron
    local = spec.layer - stage_layers(shape, pp_rank, pp_size).start
    return spec.megatron.replace(f"decoder.layers.{spec.layer}.", f"decoder.layers.{local}.", 1)


def to_megatron(spec: ParamSpec, hf: Sequence[Tensor], shape: ModelShape, *, tp_rank: int,
                tp_size: int, padded_vocab: int) -> Tensor:
    """The shard of `spec` held by TP rank `tp_rank`, built from its HF tensors (in spec.hf
    order). Returns a new contiguous tensor."""
    if spec.kind == "replicated":
        return hf[0].clone()
    if spec.kind == "vocab":
        full = hf[0].new_zeros((padded_vocab, *hf[0].shape[1:]))
        full[: shape.vocab_size] = hf[0]
        return full.chunk(tp_size)[tp_rank].clone()
    if spec.kind == "row":
        return hf[0].chunk(tp_size, dim=1)[tp_rank].contiguous()
    if spec.kind == "fc1":
        gate, up = (t.chunk(tp_size)[tp_rank] for t in hf)
        return torch.cat([gate, up])
    return _fuse_qkv(hf, shape).chunk(tp_size)[tp_rank].clone()


def to_hf(spec: ParamSpec, shards: Sequence[Tensor], shape: ModelShape) -> list[Tensor]:
    """The HF tensors of `spec` (in spec.hf order) from its shards, in TP-rank order."""
    if spec.kind == "replicated":
        return [shards[0].clone()]
    if spec.kind == "vocab":
        return [torch.cat(list(shards))[: shape.vocab_size].clone()]
    if spec.kind == "row":
        return [torch.cat(list(shards), dim=1)]
    if spec.kind == "fc1":
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    return _split_qkv(torch.cat(list(shards)), shape)


def _fuse_qkv(hf: Sequence[Tensor], shape: ModelShape) -> Tensor:
    """[q; k; v] HF projections (weights [out, H] or biases [out]) → the grouped layout."""
    q, k, v = hf
    ng, d = shape.num_kv_heads, shape.head_dim
    tail = q.shape[1:]
    groups = [q.reshape(ng, shape.num_heads // ng * d, *tail), k.reshape(ng, d, *tail),
              v.reshape(ng, d, *tail)]
    return torch.cat(groups, dim=1).reshape(-1, *tail)


def _split_qkv(fused: Tensor, shape: ModelShape) -> list[Tensor]:
    ng, d = shape.num_kv_heads, shape.head_dim
    per_group = shape.num_heads // ng * d
    tail = fused.shape[1:]
    grouped = fused.reshape(ng, per_group + 2 * d, *tail)
    q, k, v = grouped.split([per_group, d, d], dim=1)
    return [t.reshape(-1, *tail).clone() for t in (q, k, v)]
