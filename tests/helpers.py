"""Builders shared by tests: a real tiny model on disk, samples and batches from it."""

from __future__ import annotations

import json
from pathlib import Path

from asyncrl.models.tiny import build_char_tokenizer, build_tiny_model, save_pretrained
from asyncrl.types import Group, Prompt, Reward, Sample, TrainBatch

TINY_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=128)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                             seed=seed, **TINY_SHAPE)
    save_pretrained(model, tokenizer, path)
    return path


def make_samples(tokenizer, prompts: list[str], n: int, max_new_tokens: int) -> list[Sample]:
    return [
        Sample(sample_id=f"p{i}/{k}", prompt_id=f"p{i}", prompt_ids=tokenizer(p).input_ids,
               max_new_tokens=max_new_tokens)
        for i, p in enumerate(prompts) for k in range(n)
    ]


def as_batch(samples: list[Sample], pad_token_id: int) -> TrainBatch:
    """One group per prompt id, rewards set to 0 (only the token tensors matter here)."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        s.reward = s.reward or Reward(0.0)
        groups.setdefault(s.prompt_id, []).append(s)
    return TrainBatch.from_groups(
        [Group(Prompt(pid, "", []), ss) for pid, ss in groups.items()], pad_token_id)


def assert_ledger_file_matches(run_dir: Path, ledger: dict) -> None:
    """ledger.jsonl names every prompt and sample id once, each with one fate, and its counts
    equal the run's ledger counters (which must balance, with no duplicate)."""
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").open()]
    samples = [(i, f) for row in rows for i, f in row["samples"].items()]
    assert ledger["balance"] == 0 and ledger["duplicates"] == 0, ledger
    drawn = ledger["prompts_started"] + ledger["prompts_skipped"]
    assert len({r["prompt_id"] for r in rows}) == len(rows) == drawn
    assert len({i for i, _ in samples}) == len(samples) == ledger["started"]
    assert sum(f.startswith("trained@") for _, f in samples) == ledger["trained"]
    assert sum(f == "pending" for _, f in samples) == ledger["pending"]
    for kind in ("trained", "pending", "dropped", "skipped"):
        count = sum(r["fate"].split("@")[0].split(":")[0] == kind for r in rows)
        assert count == ledger[f"prompts_{kind}"], kind
    for row in rows:  # a trained prompt was trained once, as one whole group
        trained = {f for f in row["samples"].values() if f.startswith("trained@")}
        assert (row["fate"] in trained and len(trained) == 1) if trained else True, row
