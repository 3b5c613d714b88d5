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
from types import SimpleNamespace

import msgpack
import torch

from common.config import TrainConfig
from driver.experiment import Experiment, load_checkpoint
from driver.local import Stop, build_spec, finish_run
from driver.recovery import RecoveryMixin
from driver.live import LiveControlMixin
from common.exploration import epsilon_at
from driver.progress import (Cadence, Counters, ProgressBar, ReportWindow, episodes_left, explain_overshoot, make_record,
                             progress_line)
from learner.learner import Learner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_PERIOD_S = 0.5


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
        trainer = DistributedTrainer(cfg, exp, resume_from=resume_from,
                                     target_episodes=target_episodes if target_episodes is not None else cfg.num_episodes, log=log)
        return trainer.run()
    finally:
        if started:
            ray.shutdown()


class DistributedTrainer(RecoveryMixin, LiveControlMixin):
    """One training job on a Ray cluster: starts the roles, runs the driver loop, cleans up."""

    def __init__(self, cfg: TrainConfig, exp: Experiment, *, resume_from: str | None,
                 target_episodes: int, log=print):
        from driver.ray_roles import remote_role_classes
        self.cfg, self.exp, self.log = cfg, exp, log
        self.target_episodes = target_episodes
        self.spec = build_spec(cfg)
        check_capacity(cfg.effective_num_actors)
        self.replay_cls, self.learner_cls, self.actor_cls = remote_role_classes(_learner_gpus(cfg))
        self.counters = Counters()
        self.ck_bytes = None
        if resume_from is not None:
            ck = load_checkpoint(resume_from)
            self.counters = Counters.from_dict(ck["counters"])
            buf = io.BytesIO()
            torch.save(ck["learner"], buf)
            self.ck_bytes = buf.getvalue()
            log(f"Resumed from {resume_from}: episode {self.counters.episodes}, "
                f"{self.counters.updates} updates")
        self.cfg_d, self.spec_d = cfg.to_dict(), self.spec.to_dict()
        self.actors: list = []
        self.inflight: dict = {}
        self.actor_versions: list[int] = []
        self.actor_cpu_s = 0.0                   # CPU seconds all actor processes spent acting
        self._init_recovery(resume_from)         # driver/recovery.py: restarts, snapshots
        from driver.experiment import WriteGuard
        self.guard = WriteGuard(log)              # periodic writes that fail: reported, retried

    # -- roles ---------------------------------------------------------------------------------
    def start_roles(self) -> None:
        import ray
        cfg = self.cfg
        self.replay = self._new_replay()
        self._after_replay_started()             # resume: restore the replay snapshot
        self.learner = self.learner_cls.remote(self.cfg_d, self.spec_d, self.replay, self.ck_bytes)
        self.weights = ray.get(self.learner.latest_weights.remote())
        for _ in range(cfg.effective_num_actors):
            self.add_actor()
        ray.get(self.learner.start.remote())

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

    # -- checkpoints ---------------------------------------------------------------------------
    def learner_state(self) -> dict:
        return torch.load(io.BytesIO(self._learner_checkpoint_bytes()),
                          map_location="cpu", weights_only=True)

    def save(self, name: str) -> None:
        self.counters.wall_time = self.wall0 + time.time() - self.t_start
        self.exp.save_checkpoint({"format": 1, "learner": self.learner_state(), "spec": self.spec_d,
                                  "config": self.cfg_d, "counters": self.counters.to_dict()}, name)
        self._after_save(name)                   # restarts start from it; replay snapshot

    # -- driver loop ---------------------------------------------------------------------------
    def _on_chunk(self, i: int, summary: dict) -> None:
        c = self.counters
        c.env_steps += summary["env_steps"]
        c.trials += len(summary["trials"])
        self.win.add_trial_summaries(summary["trials"], self.status["version"])
        self.win.add_episodes([SimpleNamespace(steps=e[0], reward=e[1]) for e in summary["episodes"]])
        c.episodes += len(summary["episodes"])
        self.actor_versions[i] = summary["weights_version"]
        self.actor_cpu_s += float(summary.get("cpu_s", 0.0))

    def _poll(self) -> None:
        self.status = msgpack.unpackb(self._learner_get("status"), raw=False)
        if self.status.get("error"):
            raise RuntimeError(f"learner failed: {self.status['error']}")
        self.weights = self._learner_get("latest_weights")
        self.rstats = self._replay_get("stats")
        self.counters.updates = self.status["updates"]        # the learner's count (resumed ones included)
        self.counters.trial_steps_trained = self.steps0 + self.status["trial_steps"]
        for r in self.status["recent"]:
            self.win.add_learner_stats(r)

    def _report(self, line: bool = True) -> dict:
        cfg, c = self.cfg, self.counters
        now = time.time()
        last = self.last
        dtime = max(1e-9, now - last["t"])
        c.wall_time = self.wall0 + now - self.t_start
        idle = self.status.get("idle_s", 0.0)
        eps = epsilon_at(c.env_steps, cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps, cfg.dt)
        rec = make_record(
            self.win, c, env_name=cfg.env_name, dt=cfg.dt, epsilon=eps,
            weights_version=self.status["version"], elapsed=c.wall_time,
            rate_env=(c.env_steps - last["env"]) / dtime, rate_upd=(c.updates - last["upd"]) / dtime,
            rate_train=(c.trial_steps_trained - last["train"]) / dtime,
            replay_size=self.rstats["size"], num_actors=len([a for a in self.actors if a is not None]),
            extra={"learner_idle_frac": min(1.0, (idle - last["idle"]) / dtime),
                   "samples_per_insert": self.rstats.get("samples_per_insert"),
                   "replay_rejected": self.rstats.get("rejected", 0),
                   "actor_weights_versions": list(self.actor_versions),
                   "actor_cpu_s": self.actor_cpu_s,
                   **self._fault_metrics(),
                   **{k: self.status[k] for k in ("eta", "lambda") if k in self.status}})
        self.last = {"t": now, "env": c.env_steps, "upd": c.updates, "train": c.trial_steps_trained,
                     "idle": idle}
        self._live_record(rec)                   # driver/live.py: actor_nodes
        self.guard.attempt("metrics record", lambda: self.exp.append_metrics(rec))
        self.telemetry.log(rec)                  # TensorBoard, Prometheus, heartbeat
        if line:
            self.bar.clear()
            self.log(progress_line(rec, self.target_episodes))
            if rec["accuracy"] is not None and rec["accuracy"] > c.best_accuracy and c.updates > 0:
                c.best_accuracy = rec["accuracy"]
                self.guard.attempt("best model", lambda: self.save("best_model.pt"))
        self.win = ReportWindow()
        return rec

    def run(self) -> dict:
        import ray
        cfg, c = self.cfg, self.counters
        self.t_start = time.time()
        self.wall0 = c.wall_time
        self.steps0 = c.trial_steps_trained
        self.start_roles()
        self.log(f"Replay server, learner and {len(self.actors)} actor(s) started in "
                 f"{time.time() - self.t_start:.1f} s; filling replay: learning starts after "
                 f"{cfg.learning_starts} trials")
        self._live_start()                       # driver/live.py: telemetry, heartbeat, scaling
        self.win = ReportWindow()
        self.status = {"version": self.weights[0], "updates": c.updates, "trial_steps": 0, "idle_s": 0.0}
        self.rstats = {"size": 0}
        self.last = {"t": self.t_start, "env": c.env_steps, "upd": c.updates,
                     "train": c.trial_steps_trained, "idle": 0.0}
        cadence = Cadence(cfg, c.episodes, self.t_start, self.target_episodes, c.trials)
        self.bar = ProgressBar(self.target_episodes, c.episodes)
        deadline = self.t_start + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
        self.bar.deadline = deadline
        last_status = 0.0
        interrupted = None
        with Stop() as stop:
            while episodes_left(c.episodes, self.target_episodes):
                if stop.requested or (deadline is not None and time.time() > deadline):
                    interrupted = stop.signal_name if stop.requested else None
                    if not stop.requested:
                        self.log(f"Time limit of {cfg.time_limit_minutes} min reached.")
                    break
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=STATUS_PERIOD_S)
                for ref in ready:
                    i = self.inflight.pop(ref)
                    summary = self._collect_chunk(i, ref)    # None: the actor died, replaced
                    if summary is None:
                        continue
                    self._on_chunk(i, summary)
                    self._submit(i)
                self._tick()                     # replay snapshot due? (and test fault hooks)
                self._live_tick()                # scale requests (control.json), heartbeat
                now = time.time()
                kind = cadence.record_due(c.episodes, now, self.target_episodes, c.trials)
                if kind or now - last_status > STATUS_PERIOD_S:
                    last_status = now
                    self._poll()
                self.bar.update(c.episodes)
                if kind:
                    cadence.recorded(kind, c.episodes, now, c.trials)
                    self._report(line=kind == "line")
                if cadence.checkpoint_due(c.episodes, now):
                    cadence.checkpointed(c.episodes, now)
                    self.guard.attempt("checkpoint", lambda: self.save(f"checkpoint_{c.episodes}.pt"))
        self.bar.clear()
        explain_overshoot(c.episodes, self.target_episodes, cfg.envs_per_actor, self.log)
        self._live_close("interrupted" if interrupted else "finished")
        self.stop_roles()
        self._poll()
        c.wall_time = self.wall0 + time.time() - self.t_start
        self._final_snapshot()
        local = Learner.from_config(self.spec, TrainConfig.from_dict({**self.cfg_d, "device": "cpu"}))
        local.load_state_dict(self.learner_state())
        self.kill_all()
        return finish_run(self.exp, cfg, self.spec, local, c, interrupted, log=self.log)
