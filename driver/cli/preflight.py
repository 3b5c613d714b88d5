"""Checks of a command's input that need the outside world (the task registry, the GPU, the
file system, the Ray cluster), run before anything is written; misuse is :class:`UsageError`:
one line, exit 2."""
from __future__ import annotations

import os

from mpn_dqn.common.config import TrainConfig


class UsageError(Exception):
    """CLI misuse: printed as one line, exit code 2."""


def task_and_device_preflight(cfg: TrainConfig) -> None:
    """Checks that need the outside world (task registry, GPU) — before anything is written."""
    from mpn_dqn.common.tasks import TaskError, UnknownTaskError, check_task
    try:
        check_task(cfg.env_name, cfg.dt)
    except (TaskError, UnknownTaskError) as exc:
        raise UsageError(f"train-neurogym: {exc}") from exc
    from mpn_dqn.learner.learner import DeviceError, resolve_device
    try:
        resolve_device(cfg.device)
    except DeviceError as exc:
        raise UsageError(f"train-neurogym: {exc}") from exc


def writable_dir(path: str) -> None:
    """--experiments-dir must be (or be creatable as) a directory this process can write."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"train-neurogym: --experiments-dir {path} is a file, not a directory")
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"train-neurogym: cannot write in {probe} (--experiments-dir {path}); choose a "
                         "writable directory")


def capacity_preflight(cfg: TrainConfig, command: str = "train-neurogym") -> bool:
    """Refuse an actor count the cluster cannot place, before anything is written: on the
    embedded Ray (this machine's CPUs) without starting it; on a cluster (--address,
    RAY_ADDRESS, or a Ray already initialised in this process) by joining it first.  Returns
    True if Ray was started here (the caller shuts it down)."""
    n = cfg.effective_num_actors
    if n == 0:
        return False
    import ray
    if not (ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS")):
        cpus = os.cpu_count() or 1
        if n + 1 > cpus:
            fewer = max(0, cpus - 1)
            if command == "resume":      # resume takes the count from config.json
                raise UsageError(f"resume: the run's config.json has num_actors {n}, which needs "
                                 f"{n + 1} CPUs (one per actor and one for the learner) but this "
                                 f"machine has {cpus}; set num_actors to {fewer} or fewer there "
                                 "(0: one process), or join a cluster with RAY_ADDRESS")
            raise UsageError(f"{command}: --num-actors {n} needs {n + 1} CPUs (one per actor and "
                             f"one for the learner) but this machine has {cpus}; use --num-actors "
                             f"{fewer} or fewer (0: one process), or join a cluster with --address")
        return False
    from mpn_dqn.driver.runtime.ray_cluster import ClusterError, check_capacity, check_reachable, init_ray
    try:
        if cfg.address:
            check_reachable(cfg.address)
        started = init_ray(cfg)
    except ClusterError as exc:
        raise UsageError(f"{command}: {exc}") from exc
    try:
        check_capacity(n)
    except ClusterError as exc:
        if started:
            ray.shutdown()
        raise UsageError(f"{command}: {exc}") from exc
    return started
