"""Rollout: engines that generate, the worker actor body around one, and the manager."""
