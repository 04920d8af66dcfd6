"""HF ↔ Megatron names and layouts (asyncrl.train.megatron.convert): hand-worked fused layouts,
exact round trips of real tiny models' weights at TP 1, 2 and 4, and the configs refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from asyncrl.models.tiny import build_tiny_model
from asyncrl.train.megatron import convert
from asyncrl.train.megatron.convert import ModelShape, ParamSpec, UnsupportedModel


def _shape(**kw) -> ModelShape:
    base = dict(num_layers=1, hidden_size=1, num_heads=4, num_kv_heads=2, head_dim=1,
                intermediate_size=4, vocab_size=5, qkv_bias=True, tied=True)
    return ModelShape(**(base | kw))


def test_fused_qkv_interleaves_query_groups_and_tp_ranks_hold_whole_groups():
    # 4 query heads, 2 KV heads, head_dim 1, hidden 1: group g = (q[2g], q[2g+1], k[g], v[g]).
    shape = _shape()
    spec = ParamSpec("decoder.layers.0.self_attention.linear_qkv.weight", ("q", "k", "v"), "qkv")
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k, v = torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    tp1 = convert.to_megatron(spec, [q, k, v], shape, tp_rank=0, tp_size=1, padded_vocab=5)
    assert tp1.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    tp2 = [convert.to_megatron(spec, [q, k, v], shape, tp_rank=r, tp_size=2, padded_vocab=5)
           for r in range(2)]
    assert [t.flatten().tolist() for t in tp2] == [[0, 1, 10, 20], [2, 3, 11, 21]]
    back = convert.to_hf(spec, tp2, shape)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v], strict=True))


def test_fused_gate_up_is_concatenated_per_tp_rank_not_globally():
    shape = _shape()
    spec = ParamSpec("decoder.layers.0.mlp.linear_fc1.weight", ("gate", "up"), "fc1")
    gate = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    up = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    shards = [convert.to_megatron(spec, [gate, up], shape, tp_rank=r, tp_size=2, padded_vocab=5)
              for r in range(2)]
    # SwiGLU splits each rank's output in halves, gate first: [gate_r; up_r] on rank r.
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    back = convert.to_hf(spec, shards, shape)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_vocab_is_padded_with_zero_rows_and_sliced_back():
    shape = _shape(vocab_size=5)
    spec = ParamSpec("embedding.word_embeddings.weight", ("e",), "vocab")
    emb = torch.arange(10.0).reshape(5, 2) + 1
    padded = shape.padded_vocab(2)
    shards = [convert.to_megatron(spec, [emb], shape, tp_rank=r, tp_size=2, padded_vocab=padded)
              for r in range(2)]
    assert padded == 6 and [s.shape[0] for s in shards] == [3, 3]
    assert shards[1][-1].tolist() == [0.0, 0.0]
    assert torch.equal(convert.to_hf(spec, shards, shape)[0], emb)
    assert _shape(vocab_size=55).padded_vocab(2, multiple=128) == 256


def _llama(tied: bool):
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=tied, rope_theta=5e5)
    torch.manual_seed(1)
    return LlamaForCausalLM(config)


def _qwen2():
    return build_tiny_model(55, 0, 1, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_position_embeddings=128, seed=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-untied", "llama-tied"])
def test_hf_weights_round_trip_through_megatron_shards_exactly(arch, tp):
    # Every HF tensor → TP shards → HF again, bit for bit; every HF name is covered once.
    model = {"qwen2-tied": _qwen2, "llama-untied": lambda: _llama(False),
             "llama-tied": lambda: _llama(True)}[arch]()
    shape = ModelShape.from_hf_config(model.config)
    hf = model.state_dict()
    padded = shape.padded_vocab(tp)
    out: dict[str, torch.Tensor] = {}
    for spec in convert.param_specs(shape):
        shards = [convert.to_megatron(spec, [hf[n] for n in spec.hf], shape, tp_rank=r,
                                      tp_size=tp, padded_vocab=padded) for r in range(tp)]
        if not spec.sharded:
            assert all(torch.equal(s, shards[0]) for s in shards)
        for name, tensor in zip(spec.hf, convert.to_hf(spec, shards, shape), strict=True):
            assert name not in out, f"{name} emitted twice"
            out[name] = tensor
    for alias, source in convert.tied_aliases(shape).items():
        out[alias] = out[source]
    assert out.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(out[name], tensor), name


def test_shapes_read_from_hf_configs():
    qwen = ModelShape.from_hf_config(_qwen2().config)
    assert (qwen.qkv_bias, qwen.tied, qwen.num_kv_heads, qwen.head_dim) == (True, True, 2, 16)
    llama = ModelShape.from_hf_config(_llama(False).config)
    assert (llama.qkv_bias, llama.tied, llama.rope_theta) == (False, False, 5e5)
    llama3 = LlamaConfig(max_position_embeddings=16384, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    assert ModelShape.from_hf_config(llama3).rope_scaling_factor == 8.0


@pytest.mark.parametrize("config, match", [
    (Qwen2Config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (LlamaConfig(mlp_bias=True), "SwiGLU"),
    (LlamaConfig(attention_bias=True), "o_proj bias"),
    (Qwen2Config(use_sliding_window=True), "sliding-window"),
    (type("Cfg", (), {"model_type": "gpt2"})(), "model_type 'gpt2'"),
])
def test_models_megatron_cannot_reproduce_are_refused_naming_the_backend(config, match):
    with pytest.raises(UnsupportedModel, match=match) as info:
        ModelShape.from_hf_config(config)
    assert "trainer.backend=torch" in str(info.value)


def test_parallel_sizes_that_split_a_group_are_refused_naming_the_field():
    shape = ModelShape.from_hf_config(_qwen2().config)  # 2 KV heads, 2 layers
    shape.check_parallel(2, 2)
    with pytest.raises(ValueError, match="trainer.tensor_parallel_size"):
        shape.check_parallel(4, 1)
    with pytest.raises(ValueError, match="trainer.pipeline_parallel_size"):
        shape.check_parallel(1, 3)


def test_pipeline_stages_own_their_layers_under_local_names():
    shape = ModelShape.from_hf_config(_qwen2().config)
    specs = convert.param_specs(shape, pp_size=2)
    last = [(s.megatron, convert.local_name(s, shape, 1, 2)) for s in specs
            if convert.on_stage(s, shape, 1, 2)]
    assert ("decoder.layers.1.mlp.linear_fc2.weight",
            "decoder.layers.0.mlp.linear_fc2.weight") in last
    assert not any(m.startswith(("embedding.", "decoder.layers.0.")) for m, _ in last)
    # Tied embeddings: the last stage keeps a duplicate output layer of the same HF tensor.
    dup = [s for s in specs if s.duplicate]
    assert [(s.megatron, s.hf) for s in dup] == [("output_layer.weight",
                                                  ("model.embed_tokens.weight",))]


def test_selecting_nothing_megatron_imports_no_megatron():
    # The worker imports the backend module only when configured, and even that module (and
    # convert) defer megatron.core until a MegatronBackend is built (STYLE §8.1 rule 10).
    code = ("import sys; import asyncrl.train.worker, asyncrl.train.megatron.backend, "
            "asyncrl.train.megatron.convert; print('megatron' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
