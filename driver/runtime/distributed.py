"""The distributed runtime on Ray: the driver that wires actors, replay server and learner.

The roles are the plain classes of ``actors/``, ``replay/`` and ``learner/``, put on Ray by
``driver/runtime/ray_roles.py``; this module starts them and drives them:

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
import time

import torch

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.experiment import Experiment
from mpn_dqn.driver.runtime.live import LiveControlMixin
from mpn_dqn.driver.runtime.loop import STATUS_PERIOD_S, TrainingLoop
from mpn_dqn.driver.runtime.ray_cluster import (actor_scheduling, check_capacity, init_ray, learner_gpus,
                                                shutdown_after)
from mpn_dqn.driver.runtime.recovery import RecoveryMixin

def train_distributed(cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                      target_episodes: int | None = None, log=print) -> dict:
    torch.set_num_threads(1)
    with shutdown_after(init_ray(cfg, log)):
        trainer = DistributedTrainer(cfg, exp, resume_from=resume_from, target_episodes=target_episodes,
                                     log=log)
        return trainer.run()


class DistributedTrainer(RecoveryMixin, LiveControlMixin, TrainingLoop):
    """The Ray placement of the training loop: each role a Ray actor, dead roles restarted
    (``driver/runtime/recovery.py``), actors scaled live (``driver/runtime/live.py``)."""

    def __init__(self, cfg: TrainConfig, exp: Experiment, *, resume_from: str | None,
                 target_episodes: int | None = None, log=print):
        from mpn_dqn.driver.runtime.ray_roles import remote_role_classes
        TrainingLoop.__init__(self, cfg, exp, resume_from=resume_from, target_episodes=target_episodes,
                              log=log)
        check_capacity(cfg.effective_num_actors)
        self.replay_cls, self.learner_cls, self.actor_cls = remote_role_classes(learner_gpus(cfg))
        self.actors: list = []
        self.inflight: dict = {}
        self._init_recovery()                    # driver/runtime/recovery.py: restarts

    # -- roles ---------------------------------------------------------------------------------
    def start_roles(self) -> None:
        import ray
        cfg = self.cfg
        self.replays = [self._new_replay(k) for k in range(self.shards)]
        self.restore_replay()                    # resume: the replay snapshots
        self.learner = self.learner_cls.remote(self.cfg_d, self.spec_d, list(self.replays), self.ck_bytes)
        self.weights = ray.get(self.learner.latest_weights.remote())
        for _ in range(cfg.effective_num_actors):
            self.add_actor()
        ray.get(self.learner.start.remote())

    def started_message(self) -> str:
        servers = f"{self.shards} replay servers" if self.shards > 1 else "Replay server"
        return (f"{servers}, learner and {len(self.actors)} actor(s) started in "
                f"{time.time() - self.t_start:.1f} s; filling replay: learning starts after "
                f"{self.cfg.learning_starts} trials")

    def open_observation(self) -> None:
        self._live_start()                       # driver/runtime/live.py: telemetry, heartbeat, scaling

    def add_actor(self) -> None:
        """Start one more actor with the current weights and give it work."""
        i = len(self.actors)
        params_msg = self._params_msg()
        actor = self.actor_cls.options(scheduling_strategy=actor_scheduling()).remote(
            self.cfg_d, self.spec_d, i, max(1, self.cfg.effective_num_actors),
            self.replays[i % len(self.replays)], params_msg,
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
        return self._live_record(rec)            # driver/runtime/live.py: actor_nodes

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
        for r in self.replays:
            ray.kill(r)
