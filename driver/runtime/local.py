"""The single-process placement of the training loop: replay server, one actor and the
learner in this process, no Ray (``--num-actors 0``).

The roles are the classes the Ray placement distributes (``replay/server.py``,
``actors/worker.py``, ``learner/worker.py``), handed in-process clients (:mod:`common.roles`).
Each loop turn the actor takes a few vectorised env steps and ships its trials, then the learner
trains on as many batches as the replay's samples-per-insert rate limiter allows.  Nothing
depends on thread timing, so a run is the same draw for draw every time: the reference for
debugging and the deterministic path for tests.
"""
from __future__ import annotations

import msgpack
import torch

from mpn_dqn.actors.worker import ActorWorker
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.common.roles import LocalReplay
from mpn_dqn.driver.experiment import CheckpointError, Experiment
from mpn_dqn.driver.runtime.loop import TrainingLoop
from mpn_dqn.driver.observe.telemetry import Telemetry
from mpn_dqn.learner.worker import LearnerWorker
from mpn_dqn.replay.server import ReplayServer
from mpn_dqn.replay.snapshot import SnapshotError

PUBLISH_EVERY_UPDATES = 10      # actors see new weights every 10 updates (as on Ray)
CHUNK_STEPS = 8                 # vectorised env steps the actor takes per loop turn


class LocalTrainer(TrainingLoop):
    def start_roles(self) -> None:
        c = self.counters
        self.replay = ReplayServer(**ReplayServer.config_kwargs(self.cfg, self.spec),
                                   seed=self.cfg.seed + c.episodes)
        self.restore_replay()                    # resume: the replay snapshot
        client = LocalReplay(self.replay)
        self.learner = LearnerWorker(self.cfg_d, self.spec_d, client, self.ck_bytes,
                                     publish_period=PUBLISH_EVERY_UPDATES)
        self.weights = self.learner.latest_weights()
        version, params_msg = self.weights
        self.actor = ActorWorker(self.cfg_d, self.spec_d, 0, 1, client, params_msg,
                                 seed_offset=7919 * c.episodes)
        self.actor_versions = [version]

    def started_message(self) -> str:
        return f"Filling replay: learning starts after {self.cfg.learning_starts} trials"

    def open_observation(self) -> None:
        self.telemetry = Telemetry(self.exp.dir, runtime="local")     # TensorBoard + heartbeat.json

    def next_chunks(self) -> list[tuple[int, dict]]:
        summary = self.actor.run_chunk(self.counters.env_steps, self.weights, steps=CHUNK_STEPS)
        self.learner.train_available()
        self.weights = self.learner.latest_weights()
        return [(0, msgpack.unpackb(summary, raw=False))]

    def _learner_get(self, name: str, *args):
        return getattr(self.learner, name)(*args)

    def _replay_get(self, name: str, *args):
        return getattr(self.replay, name)(*args)

    def _replay_restore(self, data: bytes, where: str, shard: int = 0) -> dict:
        try:
            return self.replay.restore(data, where)
        except SnapshotError as exc:
            raise CheckpointError(str(exc)) from None

    def placement_record(self, rec: dict) -> dict:
        rec["actor_nodes"], rec["num_nodes"] = [], 1
        return rec

    def active_actor_count(self) -> int:
        return 0                                 # no actor processes: the actor runs in the driver

    def kill_all(self) -> None:
        self.actor.drain(0.0)
        self.actor.collector.close()


def train_local(cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                target_episodes: int | None = None, log=print) -> dict:
    """Train in one process.  With ``resume_from`` (a checkpoint path) continue that run."""
    torch.set_num_threads(1)
    return LocalTrainer(cfg, exp, resume_from=resume_from, target_episodes=target_episodes, log=log).run()
