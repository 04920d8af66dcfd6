"""Pure maths of RL post-training: advantages, policy losses, KL, aggregation, staleness.

Tensors in, tensors (plus a metrics dict) out. Imports only torch and the standard library:
no Ray, no config; the trainer backend maps config fields to keyword arguments in one place.
"""
