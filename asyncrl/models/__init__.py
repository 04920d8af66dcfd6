"""Model and tokenizer factories (HF format on disk, so real checkpoints load by the same path)."""
