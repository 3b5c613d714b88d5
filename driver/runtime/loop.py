"""The training loop, one for both placements.

:class:`TrainingLoop` is the driver: it hands the actors work, counts what they report, polls
the learner and the replay, writes metrics records, progress lines, the best model and periodic
checkpoints and replay snapshots, and stops on the episode target, the time limit, Ctrl-C or
SIGTERM.  Where the roles run is the placement's business, a subclass that implements the
hooks marked *placement*:

* :class:`driver.runtime.local.LocalTrainer`: the replay server, one actor worker and the learner worker
  in this process, stepped in turn (deterministic; ``--num-actors 0``);
* :class:`driver.runtime.distributed.DistributedTrainer`: each role a Ray actor, with restarts of dead
  roles (``driver/runtime/recovery.py``) and live scaling (``driver/runtime/live.py``).

Both run the same role classes (``actors/worker.py``, ``replay/server.py``,
``learner/worker.py``), so the rate limiter, the exactly-once inserts and weight publishing act
in both, and a metrics record has the same keys in both.
"""
from __future__ import annotations

import io
import signal
import time
from types import SimpleNamespace

import msgpack
import torch

from mpn_dqn.actors.evaluate import evaluate
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.common.exploration import epsilon_at
from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
from mpn_dqn.common.tasks import task_dims
from mpn_dqn.driver.experiment import Experiment, WriteGuard, load_checkpoint
from mpn_dqn.driver.observe.progress import (Cadence, Counters, ProgressBar, ReportWindow, episodes_left,
                             explain_overshoot, make_record, progress_line)
from mpn_dqn.driver.runtime.recovery import load_resume_snapshot, snapshot_path, write_resume_json, counter_extra
from mpn_dqn.replay.snapshot import write_atomic, write_snapshot_file

STATUS_PERIOD_S = 0.5           # the learner's and replay's status are polled this often


def _eval_line(ev: dict) -> str:
    pct = ev["pct_ceiling"]
    return (f"{ev['trials']} trials: accuracy {ev['accuracy']:.3f} ± {ev['accuracy_stderr']:.3f}"
            + (f" ({pct:.1f}% of the ceiling {ev['ceiling']:.3f}, {ev['ceiling_source']})"
               if pct is not None else " (the ceiling is not above the best trivial policy)")
            + f", best trivial policy {ev['best_trivial']['accuracy']:.3f}"
            + f", fixation breaks {ev['fix_break_rate']:.2f} of trials"
            + f", premature responses {ev['premature_rate']:.2f}")


VALIDATION_SEED_OFFSET = 500_000   # validation envs: seeds apart from training and test envs


def evaluate_and_select(exp: Experiment, cfg: TrainConfig, spec: NetSpec, final_params: dict,
                        log=print) -> dict:
    """Pick the model the run hands over, on validation seeds, and test it on the eval seeds.

    Candidates: the final weights and ``best_model.pt`` (chosen during training by the training
    window's accuracy, with exploration).  Each is run greedily over ``--eval-trials`` trials on
    *validation* seeds; the better one (ties: the final model) is copied to
    ``selected_model.pt``.  Every candidate is also evaluated on the *test* seeds (those of
    ``eval``), so the selected model's test accuracy is an unbiased estimate: the test seeds
    played no part in choosing it.  Returns the summary entries ``final_eval`` (final model,
    test seeds), ``best_model_eval`` and ``selected_model``.
    """
    cands = {"final_model.pt": final_params}
    best = exp.checkpoint_dir / "best_model.pt"
    best_episode = None
    if best.exists():
        ck = load_checkpoint(best)
        net = QNetwork(spec)
        net.load_state_dict(ck["learner"]["online"])
        cands["best_model.pt"] = export_params(net)
        best_episode = int(ck.get("counters", {}).get("episodes", -1))

    def run(params, seed):
        return evaluate(spec, params, env_name=cfg.env_name, dt=cfg.dt, num_trials=cfg.eval_trials,
                        trials_per_episode=cfg.trials_per_episode, seed=seed)

    test = {name: run(p, cfg.seed) for name, p in cands.items()}
    val = {name: run(p, cfg.seed + VALIDATION_SEED_OFFSET)["accuracy"] for name, p in cands.items()}
    chosen = max(cands, key=lambda n: (val[n], n == "final_model.pt"))
    write_atomic(exp.checkpoint_dir / "selected_model.pt", (exp.checkpoint_dir / chosen).read_bytes())
    out = {"final_eval": test["final_model.pt"]}
    log("Greedy evaluation (test seeds) of final_model.pt over " + _eval_line(test["final_model.pt"]))
    if "best_model.pt" in test:
        test["best_model.pt"]["episode"] = best_episode
        out["best_model_eval"] = test["best_model.pt"]
        log(f"Greedy evaluation (test seeds) of best_model.pt (episode {best_episode}) over "
            + _eval_line(test["best_model.pt"]))
    out["selected_model"] = {"checkpoint": chosen, "validation_accuracy": val,
                             "validation_trials": cfg.eval_trials, "eval": test[chosen]}
    log(f"Selected model: {chosen} (validation accuracy "
        + ", ".join(f"{n} {a:.3f}" for n, a in val.items())
        + f") -> checkpoints/selected_model.pt, test accuracy {test[chosen]['accuracy']:.3f}")
    return out


def build_spec(cfg: TrainConfig) -> NetSpec:
    obs_dim, num_actions = task_dims(cfg.env_name, cfg.dt)
    return NetSpec.from_config(cfg, obs_dim, num_actions)


def checkpoint_payload(learner_state: dict, spec: NetSpec, cfg: TrainConfig, counters: Counters) -> dict:
    """What a checkpoint file holds: the learner's state, the network spec, the config and the
    driver's counters."""
    return {"format": 1, "learner": learner_state, "spec": spec.to_dict(), "config": cfg.to_dict(),
            "counters": counters.to_dict()}


class Stop:
    """Ctrl-C (SIGINT) or SIGTERM (systemd, Kubernetes, Slurm, ``timeout``) sets a flag; the loop
    saves a final checkpoint and a replay snapshot and returns; ``signal_name`` says which
    signal (the CLI then exits with 128 + its number, so a script can tell)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:            # a second signal: give up immediately
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.requested, self.signum = True, signum
            print(f"\n{signal.Signals(signum).name}: finishing the current step and saving a final "
                  "checkpoint (send it again to abort)...", flush=True)
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:            # not the main thread (e.g. a sweep trial): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def finish_run(exp: Experiment, cfg: TrainConfig, spec: NetSpec, learner_state: dict, counters: Counters,
               interrupted: str | None, log=print) -> dict:
    """Final checkpoint, greedy evaluation, summary and plots (shared by both runtimes)."""
    exp.save_checkpoint(checkpoint_payload(learner_state, spec, cfg, counters), "final_model.pt")
    summary = {"env_name": cfg.env_name, "dt": cfg.dt, "episodes": counters.episodes,
               "env_steps": counters.env_steps, "trials": counters.trials, "updates": counters.updates,
               "wall_time_s": counters.wall_time, "interrupted": bool(interrupted),
               "signal": interrupted or None}
    if cfg.eval_trials > 0 and not interrupted:
        online = QNetwork(spec)
        online.load_state_dict(learner_state["online"])
        summary.update(evaluate_and_select(exp, cfg, spec, export_params(online), log=log))
    exp.write_json("summary.json", summary)
    if cfg.plot_training:
        from mpn_dqn.driver.observe.plots import plot_training
        path = plot_training(exp)
        log(f"Training curves: {path}")
    return summary


def learner_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class TrainingLoop:
    """One training job: the driver loop over roles that a placement subclass runs."""

    def __init__(self, cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                 target_episodes: int | None = None, log=print):
        self.cfg, self.exp, self.log = cfg, exp, log
        self.target_episodes = target_episodes if target_episodes is not None else cfg.num_episodes
        self.spec = build_spec(cfg)
        self.cfg_d, self.spec_d = cfg.to_dict(), self.spec.to_dict()
        self.counters = Counters()
        self.ck_bytes: bytes | None = None       # the learner state a (re)started learner loads
        self.resume_from = resume_from
        if resume_from is not None:
            ck = load_checkpoint(resume_from)
            self.counters = Counters.from_dict(ck["counters"])
            self.ck_bytes = learner_bytes(ck["learner"])
            log(f"Resumed from {resume_from}: episode {self.counters.episodes}, "
                f"{self.counters.updates} updates")
        self.shards = cfg.replay_shards
        self.resume_snapshots = ([load_resume_snapshot(exp, k) for k in range(self.shards)]
                                 if resume_from is not None else [None] * self.shards)
        self.guard = WriteGuard(log)             # periodic writes that fail: reported, retried
        self.actor_versions: list[int] = []
        self.actor_cpu_s = 0.0                   # CPU seconds the actors spent acting
        self.snap_paths = [snapshot_path(exp, k) for k in range(self.shards)]
        self.snap_trials = self.counters.trials
        self.replay_snapshots = 0
        self.weights: list | None = None

    # -- placement ---------------------------------------------------------------------------
    def start_roles(self) -> None:
        """Start replay, learner and actors; set ``self.weights``; restore replay on resume."""
        raise NotImplementedError

    def started_message(self) -> str:
        raise NotImplementedError

    def open_observation(self) -> None:
        """Set ``self.telemetry`` (and whatever watches the run live)."""
        raise NotImplementedError

    def next_chunks(self) -> list[tuple[int, dict]]:
        """The actors' chunk summaries that are ready: ``[(actor index, summary), ...]``."""
        raise NotImplementedError

    def chunk_done(self, i: int) -> None:
        """Actor ``i``'s chunk was counted: give it its next one."""

    def tick(self) -> None:
        """Once per loop turn, after the chunks were counted: a replay snapshot when one is due."""
        every = self.cfg.replay_snapshot_every
        if every > 0 and self.counters.trials - self.snap_trials >= every:
            self.guard.attempt("replay snapshot", self._snapshot_replay)

    def _learner_get(self, name: str, *args):
        raise NotImplementedError

    def _replay_get(self, name: str, *args):
        raise NotImplementedError

    def _replay_restore(self, data: bytes, where: str, shard: int = 0) -> dict:
        """Restore replay server ``shard`` from snapshot bytes; CheckpointError if they do not fit."""
        raise NotImplementedError

    def _replay_snapshots(self, extra: dict) -> list[bytes]:
        """Every replay server's snapshot bytes, shard by shard."""
        return [self._replay_get("snapshot", extra)]

    def placement_record(self, rec: dict) -> dict:
        """Add where the actors run to a metrics record."""
        return rec

    def fault_metrics(self) -> dict:
        return {"actor_restarts": 0, "replay_restarts": 0, "learner_restarts": 0,
                "replay_trials_lost": 0, "replay_snapshots": self.replay_snapshots,
                "io_errors": self.guard.errors}

    def active_actor_count(self) -> int:
        raise NotImplementedError

    def learner_state(self) -> dict:
        """The learner's state dict (on the CPU)."""
        return torch.load(io.BytesIO(self._learner_get("checkpoint_bytes")), map_location="cpu",
                          weights_only=True)

    def stop_roles(self) -> None:
        """Stop the actors and the learner (the replay stays for the final snapshot)."""

    def kill_all(self) -> None:
        """Release what is left of the roles."""

    def close_observation(self, status: str) -> None:
        tel = getattr(self, "telemetry", None)
        if tel is not None and not tel.closed:
            tel.close(status)

    # -- replay snapshots ----------------------------------------------------------------------
    def restore_replay(self) -> None:
        """On resume: restore each replay server from its snapshot, write resume.json."""
        if self.resume_from is None:
            return
        infos, first = [], None
        for k, snap in enumerate(self.resume_snapshots):
            if snap is None:
                continue
            path, data, _ = snap
            info = self._replay_restore(data, str(path), k)
            self.replay_restored(info, k)
            infos.append(info)
            first = first or path
            self.log(f"Replay restored from {path.name}: {info['size']} trials "
                     f"({info['inserted']} inserted in all), snapshot taken at episode "
                     f"{info['extra'].get('episodes')}")
        self.resume_snapshots = [None] * self.shards      # free the bytes
        if not infos:
            self.log("No replay snapshot to restore: the replay buffer starts empty")
        info = infos[0] if len(infos) == 1 else (
            {**infos[0], **{k: sum(i[k] for i in infos) for k in ("size", "inserted", "samples")}}
            if infos else None)
        stats = self._replay_get("stats")
        write_resume_json(self.exp, self.resume_from, self.counters.to_dict(), first, info,
                          {"size": stats["size"], "inserted": stats["inserted"],
                           "sampled": stats["sampled"]})

    def replay_restored(self, info: dict, shard: int = 0) -> None:
        """Replay server ``shard`` was restored from a snapshot on resume (``info``: what it holds)."""

    def _snapshot_replay(self) -> None:
        self.snap_trials = self.counters.trials      # also after a failed write: retry at the next interval
        for path, data in zip(self.snap_paths, self._replay_snapshots(counter_extra(self.counters))):
            write_snapshot_file(path, data)
        self.replay_snapshots += 1

    def _try_snapshot(self) -> None:
        """A replay snapshot unless they are off; a failed write is reported and retried."""
        if self.cfg.replay_snapshot_every > 0:
            self.guard.attempt("replay snapshot", self._snapshot_replay)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, name: str) -> None:
        self.counters.wall_time = self.wall0 + time.time() - self.t_start
        self.exp.save_checkpoint(checkpoint_payload(self.learner_state(), self.spec, self.cfg, self.counters),
                                 name)
        self.after_save(name)

    def after_save(self, name: str) -> None:
        if name.startswith("checkpoint_"):
            self._try_snapshot()

    # -- the loop ------------------------------------------------------------------------------
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
        self.win.staleness.extend(self.status.get("staleness", []))

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
            replay_size=self.rstats["size"], num_actors=self.active_actor_count(),
            extra={"learner_idle_frac": min(1.0, max(0.0, idle - last["idle"]) / dtime),
                   "samples_per_insert": self.rstats.get("samples_per_insert"),
                   "replay_rejected": self.rstats.get("rejected", 0),
                   "replay_duplicates": self.rstats.get("duplicates", 0),
                   "actor_weights_versions": list(self.actor_versions),
                   "actor_cpu_s": self.actor_cpu_s,
                   **self.fault_metrics(),
                   **{k: self.status[k] for k in ("eta", "lambda") if k in self.status}})
        self.last = {"t": now, "env": c.env_steps, "upd": c.updates, "train": c.trial_steps_trained,
                     "idle": idle}
        self.placement_record(rec)
        self.guard.attempt("metrics record", lambda: self.exp.append_metrics(rec))
        self.telemetry.log(rec)                  # TensorBoard (+ Prometheus), heartbeat
        if line:
            self.bar.clear()
            self.log(progress_line(rec, self.target_episodes))
            if rec["accuracy"] is not None and rec["accuracy"] > c.best_accuracy and c.updates > 0:
                c.best_accuracy = rec["accuracy"]
                self.guard.attempt("best model", lambda: self.save("best_model.pt"))
        self.win = ReportWindow()
        return rec

    def run(self) -> dict:
        cfg, c = self.cfg, self.counters
        self.t_start = time.time()
        self.wall0 = c.wall_time
        self.steps0 = c.trial_steps_trained
        self.start_roles()
        self.log(self.started_message())
        self.open_observation()
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
                for i, summary in self.next_chunks():
                    self._on_chunk(i, summary)
                    self.chunk_done(i)
                self.tick()
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
        self.stop_roles()
        self._poll()
        c.wall_time = self.wall0 + time.time() - self.t_start
        self._try_snapshot()
        state = self.learner_state()
        self.kill_all()
        try:
            summary = finish_run(self.exp, cfg, self.spec, state, c, interrupted, log=self.log)
        except BaseException:
            self.close_observation("failed")     # e.g. the final checkpoint could not be written
            raise
        self.close_observation("interrupted" if interrupted else "finished")
        return summary
