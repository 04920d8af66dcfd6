"""A tiny Qwen2-architecture causal LM with a char-level tokenizer, built locally from a config.

Nothing is downloaded: the tokenizer's vocabulary is a fixed character set, the model is random
init. Both are saved as a normal HF model directory so every other component loads them with
`AutoTokenizer` / `AutoModelForCausalLM` by path, exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Every character the built-in tasks and their prompts use.
# No space: AutoTokenizer drops it when it reloads a Split pre-tokenizer (transformers 5.19).
CHARSET = string.digits + string.ascii_lowercase + "+-*=,.:?()[]<>|_"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARSET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
) -> Qwen2ForCausalLM:
    import torch

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_pretrained(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
