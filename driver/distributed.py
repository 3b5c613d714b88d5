"""The distributed runtime on Ray: the driver that wires actors, replay server and learner.

The roles are the plain classes of ``actors/``, ``replay/`` and ``learner/``, put on Ray by
``driver/ray_roles.py``; this module starts them and drives them:

    actors --(trials, msgpack)--> replay server --(batches, msgpack)--> learner
    learner --(weights, msgpack, one ray.put per version)--> actors (via the driver's calls)
    actors/learner --(summaries/status, msgpack)--> driver --> metrics.jsonl, progress, checkpoints

With no ``--address`` (and no RAY_ADDRESS) an embedded local Ray is started on 127.0.0.1
and shut down at the end; otherwise the driver joins the cluster and leaves it running.
Placement: actors use Ray's SPREAD strategy, so they are spread over the cluster's nodes (inside
a ``sweep`` trial: the bundles of the trial's placement group); the
learner asks for one GPU when the cluster has one (``--device auto``) or must (``cuda``).
"""
from __future__ import annotations

import io
import logging
import os
import time

import torch

from common.config import TrainConfig
from driver.experiment import Experiment
from driver.live import LiveControlMixin
from driver.loop import STATUS_PERIOD_S, TrainingLoop
from driver.recovery import RecoveryMixin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured (e.g. not enough CPUs for the actors)."""


def worker_env() -> dict:
    return {"env_vars": {"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
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
        from driver.ray_local import init_local_ray     # every Ray port on 127.0.0.1 only
        t0 = time.time()
        log(f"Starting an embedded Ray on 127.0.0.1 ({os.cpu_count() or 1} CPUs) ...")
        init_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, **common)
        log(f"Ray started in {time.time() - t0:.1f} s")
    return True


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


def _learner_gpus(cfg: TrainConfig) -> float:
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


def check_capacity(num_actors: int, learner_cpus: int = 1) -> None:
    import ray
    pg = current_placement_group()
    if pg is not None:
        cpus = sum(b.get("CPU", 0) for b in pg.bundle_specs)
        if cpus < num_actors + learner_cpus:
            raise ClusterError(f"{num_actors} actors + the learner need {num_actors + learner_cpus} CPUs "
                               f"but this job's placement group holds {cpus:g}")
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < num_actors + learner_cpus:
        raise ClusterError(f"{num_actors} actors + the learner need {num_actors + learner_cpus} CPUs "
                           f"but the Ray cluster has {cpus:g}; use fewer --num-actors or add nodes")


def epsilon_spread(actors: list, draining) -> dict[int, tuple[int, int]]:
    """(rank, count) of each active actor (not None, not draining) for the Ape-X ε spread:
    ranks 0..n-1 over the actors that run now, so that after ``scale`` the n actors span the
    whole spread again."""
    active = [i for i, a in enumerate(actors) if a is not None and i not in draining]
    return {i: (r, len(active)) for r, i in enumerate(active)}


def train_distributed(cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                      target_episodes: int | None = None, log=print) -> dict:
    import ray
    torch.set_num_threads(1)
    started = init_ray(cfg, log)
    try:
        trainer = DistributedTrainer(cfg, exp, resume_from=resume_from, target_episodes=target_episodes,
                                     log=log)
        return trainer.run()
    finally:
        if started:
            ray.shutdown()


class DistributedTrainer(RecoveryMixin, LiveControlMixin, TrainingLoop):
    """The Ray placement of the training loop: each role a Ray actor, dead roles restarted
    (``driver/recovery.py``), actors scaled live (``driver/live.py``)."""

    def __init__(self, cfg: TrainConfig, exp: Experiment, *, resume_from: str | None,
                 target_episodes: int | None = None, log=print):
        from driver.ray_roles import remote_role_classes
        TrainingLoop.__init__(self, cfg, exp, resume_from=resume_from, target_episodes=target_episodes,
                              log=log)
        check_capacity(cfg.effective_num_actors)
        self.replay_cls, self.learner_cls, self.actor_cls = remote_role_classes(_learner_gpus(cfg))
        self.actors: list = []
        self.inflight: dict = {}
        self._init_recovery()                    # driver/recovery.py: restarts

    # -- roles ---------------------------------------------------------------------------------
    def start_roles(self) -> None:
        import ray
        cfg = self.cfg
        self.replay = self._new_replay()
        self.restore_replay()                    # resume: the replay snapshot
        self.learner = self.learner_cls.remote(self.cfg_d, self.spec_d, self.replay, self.ck_bytes)
        self.weights = ray.get(self.learner.latest_weights.remote())
        for _ in range(cfg.effective_num_actors):
            self.add_actor()
        ray.get(self.learner.start.remote())

    def started_message(self) -> str:
        return (f"Replay server, learner and {len(self.actors)} actor(s) started in "
                f"{time.time() - self.t_start:.1f} s; filling replay: learning starts after "
                f"{self.cfg.learning_starts} trials")

    def open_observation(self) -> None:
        self._live_start()                       # driver/live.py: telemetry, heartbeat, scaling

    def add_actor(self) -> None:
        """Start one more actor with the current weights and give it work."""
        i = len(self.actors)
        params_msg = self._params_msg()
        actor = self.actor_cls.options(scheduling_strategy=actor_scheduling()).remote(
            self.cfg_d, self.spec_d, i, max(1, self.cfg.effective_num_actors), self.replay, params_msg,
            7919 * self.counters.episodes + 104_729 * i)
        self.actors.append(actor)
        self.actor_versions.append(self.weights[0])
        self._submit(i)

    def next_chunks(self) -> list[tuple[int, dict]]:
        import ray
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=STATUS_PERIOD_S)
        out = []
        for ref in ready:
            i = self.inflight.pop(ref)
            summary = self._collect_chunk(i, ref)    # None: the actor died, replaced
            if summary is not None:
                out.append((i, summary))
        return out

    def chunk_done(self, i: int) -> None:
        self._submit(i)

    def tick(self) -> None:
        self._run_fault_hooks()                  # tests
        super().tick()                           # replay snapshot due?
        self._live_tick()                        # scale requests (control.json), heartbeat

    def placement_record(self, rec: dict) -> dict:
        return self._live_record(rec)            # driver/live.py: actor_nodes

    def learner_state(self) -> dict:
        return torch.load(io.BytesIO(self._learner_checkpoint_bytes()),
                          map_location="cpu", weights_only=True)

    def stop_roles(self) -> None:
        import ray
        ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=10)
        try:
            ray.get(self.learner.stop.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass                                  # dead: the final state comes from a restart
        for a in self.actors:
            if a is not None:
                ray.kill(a)

    def kill_all(self) -> None:
        import ray
        ray.kill(self.learner)
        ray.kill(self.replay)
