"""Ray as the runtime sees it: starting an embedded Ray or joining a cluster, the cluster's
capacity, and where actors are placed.

The embedded Ray (:func:`init_local_ray`) is a single node that listens on 127.0.0.1 only.
``ray.init(_node_ip_address="127.0.0.1")`` is not enough: Ray replaces a loopback node address
by the machine's routable one, and then its GCS, raylet, workers and agents listen on every
interface.  Ray keeps everything on the loopback address only where it treats the machine as a
non-cluster host (its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch, read into
``ray._private.ray_constants.ENABLE_RAY_CLUSTER``); :func:`init_local_ray` turns that on for
the duration of ``ray.init`` only, so joining a real cluster (``--address``) is unaffected.
No dashboard web server is started: Ray's headless dashboard process runs but opens no port,
and the dashboard agent binds to 127.0.0.1 as well.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import mpn_dqn
from mpn_dqn.common.config import TrainConfig

# the folder that holds the mpn_dqn package (a checkout's root, or site-packages): Ray's worker
# processes import the roles from there
CODE_ROOT = str(Path(mpn_dqn.__file__).resolve().parents[1])


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured (e.g. not enough CPUs for the actors)."""


def worker_env() -> dict:
    return {"env_vars": {"PYTHONPATH": CODE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                         "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}}


def init_ray(cfg: TrainConfig, log=print) -> bool:
    """Start an embedded Ray or join ``--address``/RAY_ADDRESS.  Returns True if started here."""
    import ray
    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)     # keep Ray's start-up chatter off the progress
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(logging_level=logging.ERROR, log_to_driver=False, runtime_env=worker_env())
    if address:
        check_reachable(address)
        log(f"Joining Ray cluster at {address}")
        ray.init(address=address, **common)
    else:
        # this machine's CPUs, not the request: more actors than fit are refused (check_capacity)
        t0 = time.time()
        log(f"Starting an embedded Ray on 127.0.0.1 ({os.cpu_count() or 1} CPUs) ...")
        init_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, **common)
        log(f"Ray started in {time.time() - t0:.1f} s")
    return True


@contextlib.contextmanager
def shutdown_after(started: bool):
    """On leaving, shut Ray down if ``started`` (this process started or joined it)."""
    try:
        yield
    finally:
        if started:
            import ray
            ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port address must accept a TCP connection within ``timeout_s`` (Ray itself retries
    an unreachable address for minutes without a word); "auto" and ray:// URLs are left to Ray."""
    import socket
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({exc}); check --address / "
                           "RAY_ADDRESS (host:port of the head node's GCS, e.g. 127.0.0.1:6379)") from exc


def learner_gpus(cfg: TrainConfig) -> float:
    import ray
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda":
        if gpus < 1:
            raise ClusterError("--device cuda but the Ray cluster has no GPU; use --device cpu or auto")
        return 1
    if cfg.device == "auto" and gpus >= 1:
        return 1
    return 0


def current_placement_group():
    """The placement group this job runs in (a ``sweep`` trial), or None."""
    from ray.util import get_current_placement_group
    return get_current_placement_group()


def actor_scheduling():
    """Where actors go: spread over the cluster's nodes, or inside a sweep trial the bundles
    of its placement group (which reserved one CPU per actor)."""
    pg = current_placement_group()
    if pg is None:
        return "SPREAD"
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)


def check_capacity(num_actors: int) -> None:
    """The cluster (or this job's placement group) holds ``num_actors`` actors and the learner,
    one CPU each; else ClusterError saying what to change."""
    import ray
    pg = current_placement_group()
    if pg is not None:
        cpus = sum(b.get("CPU", 0) for b in pg.bundle_specs)
        where, advice = f"this job's placement group holds {cpus:g}", ""
    else:
        cpus = ray.cluster_resources().get("CPU", 0)
        where, advice = f"the Ray cluster has {cpus:g}", "; use fewer --num-actors or add nodes"
    need = num_actors + 1
    if cpus < need:
        raise ClusterError(f"{num_actors} actors + the learner need {need} CPUs but {where}{advice}")


def kill_quietly(handle) -> None:
    """``ray.kill(handle)``; a role that is already gone is fine."""
    import ray
    try:
        ray.kill(handle)
    except Exception:  # noqa: BLE001 - already gone
        pass


def epsilon_spread(actors: list, draining) -> dict[int, tuple[int, int]]:
    """(rank, count) of each active actor (not None, not draining) for the Ape-X ε spread:
    ranks 0..n-1 over the actors that run now, so that after ``scale`` the n actors span the
    whole spread again."""
    active = [i for i, a in enumerate(actors) if a is not None and i not in draining]
    return {i: (r, len(active)) for r, i in enumerate(active)}


@contextlib.contextmanager
def loopback_only():
    """While active, a new Ray node takes 127.0.0.1 as its address (and binds to it)."""
    from ray._private import ray_constants
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def init_local_ray(**kwargs) -> None:
    """``ray.init`` of a new local node bound to 127.0.0.1, without the dashboard web server."""
    import ray
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    with loopback_only():
        ray.init(_node_ip_address="127.0.0.1", **kwargs)
    _private_token()


def _private_token() -> None:
    """Ray writes the embedded cluster's auth token to ~/.ray/auth_token readable by everyone on
    the machine; make it the owner's only (the token is the key to run code on this Ray)."""
    import os
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        if os.path.isfile(path) and os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass
