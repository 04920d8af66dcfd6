"""CpuEngine tokens/s against a naive no-KV-cache decode of the same model and prompts, same run.

    python benchmarks/cpu_engine.py [--models tiny small] [--batch-sizes 8 32]
                                    [--max-new-tokens 64] [--repeats 3] [--threads 1] [--out FILE]

For each model shape and batch size, the same prompts are decoded by
- the candidate, `CpuEngine`: KV cache, continuous batching; the samples arrive as one
  `generate` call per prompt (groups of `--group` samples), run concurrently, as the rollout
  worker sends them;
- the baseline, a naive loop: a full forward over every (left-padded) sequence at every step,
  no cache, logits of the last position only (as the engine), the same sampling and logprobs.
EOS is switched off in the saved model so both decode exactly batch × max_new_tokens tokens.
Candidate and baseline alternate within each repetition (adjacent in time, so they share the
machine's load); shown are the medians, tokens/s, and ratio = engine tokens/s / naive tokens/s.
A greedy run of each model checks that both decoders pick the same tokens. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from asyncrl.models.forward import position_ids_from_mask
from asyncrl.models.tiny import build_char_tokenizer, build_tiny_model, save_pretrained
from asyncrl.rollout.engine.cpu import CpuEngine
from asyncrl.types import Sample, SamplingParams

SHAPES = {  # "tiny" is the built-in example's model; "small" makes the forward cost dominate
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                  intermediate_size=688),
}


def save_model(name: str, root: Path, max_positions: int) -> tuple[Path, int]:
    """A model dir without EOS (every sample runs to max_new_tokens) and its parameter count."""
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, seed=0,
                             max_position_embeddings=max_positions, **SHAPES[name])
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    path = root / name
    save_pretrained(model, tok, path)
    return path, sum(p.numel() for p in model.parameters())


def prompts(batch: int, group: int) -> list[list[int]]:
    """`batch` token lists: batch // group distinct digit-sorting prompts of 3 to 9 digits."""
    tok = build_char_tokenizer()
    texts = [f"sort:{'9876543210'[: 3 + i % 7]}=" for i in range(max(batch // group, 1))]
    return [tok(t).input_ids for t in texts for _ in range(group)][:batch]


async def engine_decode(engine: CpuEngine, contexts: list[list[int]], group: int,
                        new_tokens: int, params: SamplingParams) -> list[Sample]:
    samples = [Sample(f"s{i}", f"p{i // group}", list(c), new_tokens)
               for i, c in enumerate(contexts)]
    groups = [samples[i : i + group] for i in range(0, len(samples), group)]
    await asyncio.gather(*(engine.generate(g, params) for g in groups))
    return samples


@torch.no_grad()
def naive_decode(model: torch.nn.Module, contexts: list[list[int]], new_tokens: int,
                 temperature: float, generator: torch.Generator, pad: int) -> list[list[int]]:
    """Full forward over every sequence at each step; returns the generated tokens per row."""
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.bool)
    for i, ctx in enumerate(contexts):
        ids[i, width - len(ctx) :], mask[i, width - len(ctx) :] = torch.tensor(ctx), True
    out, logprobs = [], []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False,
                       position_ids=position_ids_from_mask(mask), logits_to_keep=1)
        logits = logits.logits[:, -1].float()
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        logprobs.append(torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, token))
        out.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
    return torch.cat(out, 1).tolist()


async def measure(name: str, path: Path, batch: int, args: argparse.Namespace) -> dict:
    engine = CpuEngine(str(path), seed=0)
    pad = build_char_tokenizer().pad_token_id
    contexts = prompts(batch, args.group)
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    tokens = batch * args.max_new_tokens
    engine_s, naive_s = [], []
    for rep in range(args.repeats + 1):  # the first repetition warms up and is not counted
        start = time.perf_counter()
        samples = await engine_decode(engine, contexts, args.group, args.max_new_tokens, params)
        middle = time.perf_counter()
        naive_decode(engine.model, contexts, args.max_new_tokens, 1.0, generator, pad)
        end = time.perf_counter()
        assert sum(len(s.response_ids) for s in samples) == tokens  # EOS is off
        if rep:
            engine_s.append(middle - start)
            naive_s.append(end - middle)
    await engine.close()
    engine_tps = tokens / statistics.median(engine_s)
    naive_tps = tokens / statistics.median(naive_s)
    return {"model": name, "batch": batch, "max_new_tokens": args.max_new_tokens,
            "prompt_tokens": [min(map(len, contexts)), max(map(len, contexts))],
            "engine_s": engine_s, "naive_s": naive_s, "engine_tokens_per_s": engine_tps,
            "naive_tokens_per_s": naive_tps, "ratio": engine_tps / naive_tps}


async def greedy_agrees(path: Path) -> bool:
    engine = CpuEngine(str(path))
    contexts = prompts(8, 2)
    samples = await engine_decode(engine, contexts, 2, 16, SamplingParams(temperature=0.0))
    naive = naive_decode(engine.model, contexts, 16, 0.0, torch.Generator(),
                         build_char_tokenizer().pad_token_id)
    await engine.close()
    return [s.response_ids for s in samples] == naive


async def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    # The models are saved without EOS on purpose; the engine's warning about it is noise here.
    logging.getLogger("asyncrl.rollout.engine.cpu").setLevel(logging.ERROR)
    rows, params, agree = [], {}, {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path, params[name] = save_model(name, Path(tmp), 32 + args.max_new_tokens)
            agree[name] = await greedy_agrees(path)
            for batch in args.batch_sizes:
                row = await measure(name, path, batch, args)
                rows.append(row)
                print(f"{name:>6} {params[name]:>10,} {batch:>6}"
                      f" {row['engine_tokens_per_s']:>12.0f} {row['naive_tokens_per_s']:>12.0f}"
                      f" {row['ratio']:>7.2f}", flush=True)
    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__, "threads": args.threads},
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "parameters": params, "greedy_tokens_match": agree,
            "seconds": time.perf_counter() - started, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (one request)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (worker default 1)")
    parser.add_argument("--out", default="benchmarks/results/cpu_engine.json")
    args = parser.parse_args()
    print(f"{'model':>6} {'params':>10} {'batch':>6} {'engine tok/s':>12} {'naive tok/s':>12}"
          f" {'ratio':>7}")
    report = asyncio.run(run(args))
    print(f"greedy tokens match: {report['greedy_tokens_match']}; "
          f"{report['seconds']:.0f} s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
