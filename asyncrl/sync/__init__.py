"""Weight sync: trainer rank 0 → every rollout worker over a torch.distributed group."""
