"""Time to first token after a weight update, against the same request with no update.

    python benchmarks/update_latency.py [--rows R] [--hidden H] [--layers L] [--repeats N]

A CpuEngine on a random tiny Qwen2 decodes R long rows in the background. A one-token request
then arrives either straight after `update_weights` (the new weights are copied in, and every
in-flight row is re-prefilled under them before the next step, so later logprobs are the new
policy's) or with no update. Its latency is the time to the first token under the new weights.
Printed: the medians of both and their ratio; the difference is what an update costs the
rollout side beyond the broadcast itself (benchmarks/weight_sync.py measures that).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import write_json

from asyncrl.models.tiny import build_char_tokenizer, build_tiny_model, save_pretrained
from asyncrl.rollout.engine.cpu import CpuEngine
from asyncrl.types import FinishReason, Sample, SamplingParams

PARAMS = SamplingParams(temperature=1.0)


def sample(sample_id: str, prompt: list[int], budget: int) -> Sample:
    return Sample(sample_id=sample_id, prompt_id=sample_id, prompt_ids=prompt,
                  max_new_tokens=budget, min_new_tokens=budget)


async def measure(engine: CpuEngine, weights: dict[str, torch.Tensor], rows: int,
                  args: argparse.Namespace) -> dict:
    prompt = list(range(3, 3 + args.prompt_len))
    background = asyncio.ensure_future(engine.generate(
        [sample(f"bg/{i}", prompt, args.budget) for i in range(rows)], PARAMS))
    await asyncio.sleep(0.2)  # the background rows are decoding
    plain, updated = [], []
    for i in range(args.repeats):
        for with_update, out in ((False, plain), (True, updated)):
            start = time.perf_counter()
            if with_update:
                await engine.update_weights(weights.items(), engine.policy_version + 1)
            await engine.generate([sample(f"probe/{i}/{with_update}", prompt, 1)], PARAMS)
            out.append(time.perf_counter() - start)
    await engine.abort()
    if any(s.finish_reason is not FinishReason.ABORT for s in await background):
        raise SystemExit("background rows ended before the probes did: raise --budget")
    return {"rows": rows, "plain_ms": 1e3 * statistics.median(plain),
            "after_update_ms": 1e3 * statistics.median(updated),
            "ratio": statistics.median(updated) / statistics.median(plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--budget", type=int, default=400,
                        help="tokens of each background row: enough to outlive the probes")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/update_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                             hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                             num_kv_heads=2, intermediate_size=2 * args.hidden,
                             max_position_embeddings=args.prompt_len + args.budget + 8, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tokenizer, Path(tmp))
        for count in args.rows:
            engine = CpuEngine(tmp, seed=0)
            rows.append(asyncio.run(measure(engine, weights, count, args)))
    print(f"{'rows in flight':>14} {'plain ms':>9} {'after update ms':>16} {'ratio':>6}")
    for r in rows:
        print(f"{r['rows']:>14} {r['plain_ms']:>9.1f} {r['after_update_ms']:>16.1f} "
              f"{r['ratio']:>6.2f}")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
