"""Start an embedded Ray cluster, or connect to an existing one (RAY_ADDRESS or --address)."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


# Actors load HF models; their per-load progress bars would flood the driver's console.
ACTOR_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(*, address: str | None, num_cpus: int | None, namespace: str) -> bool:
    """Returns True if this call started (and so must later stop) the Ray runtime."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": ACTOR_ENV}
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=True,
                 runtime_env=runtime_env)
        log.info("connected to Ray cluster at %s", address)
    else:
        # "local": a new embedded cluster even when `ray start` left one running here (the
        # documented rule: an existing cluster is used only when named by address).
        ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING, runtime_env=runtime_env)
        log.info("started embedded Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    return True


def shutdown_ray(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
