"""Pure maths of RL post-training: advantages, policy losses, KL, aggregation, staleness.

Tensors and plain keyword floats in, tensors (plus a metrics dict) out. Imports only torch and
the standard library: no Ray, no config. The train backend maps config fields to keyword
arguments in exactly one place.

    advantages.py  rewards [B], group_ids [B] → advantages [B]; expand_to_tokens → [B, T]
    losses.py      per-token policy losses [B, T] (not aggregated) + behaviour_weights
    aggregate.py   per-token [B, T] → scalar (token-mean, seq-mean-token-{sum,mean,sum-norm})
    kl.py          k1/k2/k3 KL estimators and entropy, per token
    staleness.py   trainer version − oldest token version of a sample

Shapes: B sequences, T tokens (asyncrl.types.TrainBatch alignment), V vocabulary.
"""
