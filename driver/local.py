"""The single-process runtime: collector, replay buffer and learner in one loop, no Ray.

It is built from exactly the components the Ray runtime distributes, so it is the reference
for debugging and the deterministic path for tests (``--num-actors 0``).
"""
from __future__ import annotations

import signal
import time

import numpy as np
import torch

from actors.collector import TrialCollector
from actors.evaluate import evaluate
from common.config import TrainConfig
from common.networks import NetSpec, QNetwork, export_params
from common.tasks import task_dims
from driver.experiment import Experiment, WriteGuard, load_checkpoint
from replay.snapshot import write_atomic
from driver.recovery import LocalReplaySnapshots
from driver.telemetry import Telemetry
from common.exploration import epsilon_at, epsilon_per_step
from driver.progress import (Cadence, Counters, ProgressBar, ReportWindow, episodes_left, explain_overshoot, make_record,
                             progress_line)
from learner.diagnostics import replay_staleness
from learner.learner import Learner
from replay.buffer import TrialBuffer

PUBLISH_EVERY_UPDATES = 10      # single process: actors see new weights every 10 updates


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


def checkpoint_payload(learner: Learner, spec: NetSpec, cfg: TrainConfig, counters: Counters) -> dict:
    return {"format": 1, "learner": learner.state_dict(), "spec": spec.to_dict(),
            "config": cfg.to_dict(), "counters": counters.to_dict()}


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


def finish_run(exp: Experiment, cfg: TrainConfig, spec: NetSpec, learner: Learner, counters: Counters,
               interrupted: str | None, log=print) -> dict:
    """Final checkpoint, greedy evaluation, summary and plots (shared by both runtimes)."""
    exp.save_checkpoint(checkpoint_payload(learner, spec, cfg, counters), "final_model.pt")
    summary = {"env_name": cfg.env_name, "dt": cfg.dt, "episodes": counters.episodes,
               "env_steps": counters.env_steps, "trials": counters.trials, "updates": counters.updates,
               "wall_time_s": counters.wall_time, "interrupted": bool(interrupted),
               "signal": interrupted or None}
    if cfg.eval_trials > 0 and not interrupted:
        summary.update(evaluate_and_select(exp, cfg, spec, export_params(learner.online), log=log))
    exp.write_json("summary.json", summary)
    if cfg.plot_training:
        from driver.plots import plot_training
        path = plot_training(exp)
        log(f"Training curves: {path}")
    return summary


def train_local(cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                target_episodes: int | None = None, log=print) -> dict:
    """Train in one process.  With ``resume_from`` (a checkpoint path) continue that run."""
    torch.set_num_threads(1)
    spec = build_spec(cfg)
    learner = Learner.from_config(spec, cfg)
    counters = Counters()
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        learner.load_state_dict(ck["learner"])
        counters = Counters.from_dict(ck["counters"])
        log(f"Resumed from {resume_from}: episode {counters.episodes}, {counters.updates} updates")
    target_episodes = target_episodes if target_episodes is not None else cfg.num_episodes
    params, version = learner.publish()
    collector = TrialCollector(cfg.env_name, cfg.dt, spec, params, num_envs=cfg.envs_per_actor,
                               trials_per_episode=cfg.trials_per_episode,
                               seed=cfg.seed + 7919 * counters.episodes, actor_id=0,
                               burn_in_steps=cfg.burn_in_steps if cfg.replay_init == "burn-in" else 0,
                               weights_version=version)
    buffer = TrialBuffer(cfg.buffer_size, spec.obs_dim, spec.state_size,
                         max_burnin=cfg.burn_in_steps if cfg.replay_init == "burn-in" else 0,
                         seed=cfg.seed + counters.episodes)
    sample_rng = np.random.default_rng([cfg.seed, counters.updates])
    stale_rng = np.random.default_rng([cfg.seed, counters.updates, 0x57A1E])   # the diagnostic's own draws
    snaps = LocalReplaySnapshots(exp, cfg, buffer, counters, log)   # driver/recovery.py
    sample_rng = snaps.restore(sample_rng, resume_from)   # resume: the replay snapshot, if any
    win = ReportWindow()
    bar = ProgressBar(target_episodes, counters.episodes)
    telemetry = Telemetry(exp.dir, runtime="local")     # TensorBoard + heartbeat.json
    t_start = time.time()
    cadence = Cadence(cfg, counters.episodes, t_start, target_episodes, counters.trials)
    guard = WriteGuard(log)                             # periodic writes that fail: reported, retried
    wall0 = counters.wall_time
    last = {"t": t_start, "env": counters.env_steps, "upd": counters.updates,
            "train": counters.trial_steps_trained}
    trials_at_learning_start = None
    updates_at_learning_start = counters.updates
    deadline = t_start + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    bar.deadline = deadline
    interrupted = None
    if len(buffer) < cfg.learning_starts:
        log(f"Filling replay: learning starts after {cfg.learning_starts} trials")
    with Stop() as stop:
        while episodes_left(counters.episodes, target_episodes):
            if stop.requested or (deadline is not None and time.time() > deadline):
                interrupted = stop.signal_name if stop.requested else None
                if deadline is not None and not stop.requested:
                    log(f"Time limit of {cfg.time_limit_minutes} min reached.")
                break
            eps = epsilon_at(counters.env_steps, cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps,
                             cfg.dt)
            collector.epsilon = epsilon_per_step(eps, cfg.dt)
            trials, episodes = collector.step()
            counters.env_steps += collector.K
            if trials:
                buffer.add_many(trials)
                counters.trials += len(trials)
                win.add_trials(trials, learner.version)
                guard.attempt("replay snapshot", lambda: snaps.tick(sample_rng))   # every --replay-snapshot-every trials
            if episodes:
                win.add_episodes(episodes)
                counters.episodes += len(episodes)
            # learner: keep the configured samples-per-insert ratio
            if len(buffer) >= cfg.learning_starts:
                if trials_at_learning_start is None:
                    trials_at_learning_start = counters.trials
                due = updates_at_learning_start + int(
                    (counters.trials - trials_at_learning_start + cfg.learning_starts)
                    * cfg.replay_ratio / cfg.trial_batch_size)
                while counters.updates < due:
                    batch = buffer.sample(cfg.trial_batch_size, rng=sample_rng)
                    stats = learner.update(batch)
                    counters.updates += 1
                    counters.trial_steps_trained += int(batch.mask.sum())
                    if counters.updates % 5 == 0:
                        win.add_learner_stats(stats)
                    if cfg.staleness_every and cfg.replay_init != "burn-in" \
                            and counters.updates % cfg.staleness_every == 0:
                        st = replay_staleness(learner.online, buffer.episode_prefixes(8, stale_rng),
                                              cfg.replay_init)
                        if st:
                            win.staleness.append(st)
                    if counters.updates % PUBLISH_EVERY_UPDATES == 0:
                        params, version = learner.publish()
                        collector.set_params(params, version)
            bar.update(counters.episodes)
            now = time.time()
            kind = cadence.record_due(counters.episodes, now, target_episodes, counters.trials)
            if kind:
                cadence.recorded(kind, counters.episodes, now, counters.trials)
                dtime = max(1e-9, now - last["t"])
                counters.wall_time = wall0 + now - t_start
                rec = make_record(
                    win, counters, env_name=cfg.env_name, dt=cfg.dt, epsilon=eps,
                    weights_version=learner.version, elapsed=counters.wall_time,
                    rate_env=(counters.env_steps - last["env"]) / dtime,
                    rate_upd=(counters.updates - last["upd"]) / dtime,
                    rate_train=(counters.trial_steps_trained - last["train"]) / dtime,
                    replay_size=len(buffer), num_actors=0, extra=learner.plasticity())
                last = {"t": now, "env": counters.env_steps, "upd": counters.updates,
                        "train": counters.trial_steps_trained}
                rec["io_errors"] = guard.errors
                guard.attempt("metrics record", lambda: exp.append_metrics(rec))
                telemetry.log(rec)
                if kind == "line":
                    bar.clear()
                    log(progress_line(rec, target_episodes))
                    if rec["accuracy"] is not None and rec["accuracy"] > counters.best_accuracy \
                            and counters.updates > 0:
                        counters.best_accuracy = rec["accuracy"]
                        guard.attempt("best model", lambda: exp.save_checkpoint(
                            checkpoint_payload(learner, spec, cfg, counters), "best_model.pt"))
                win = ReportWindow()
            if cadence.checkpoint_due(counters.episodes, now):
                cadence.checkpointed(counters.episodes, now)
                counters.wall_time = wall0 + time.time() - t_start
                name = f"checkpoint_{counters.episodes}.pt"
                guard.attempt("checkpoint", lambda: exp.save_checkpoint(
                    checkpoint_payload(learner, spec, cfg, counters), name))
                guard.attempt("replay snapshot", lambda: snaps.checkpoint(sample_rng))
    bar.clear()
    explain_overshoot(counters.episodes, target_episodes, cfg.envs_per_actor, log)
    collector.close()
    telemetry.close("interrupted" if interrupted else "finished")
    counters.wall_time = wall0 + time.time() - t_start
    guard.attempt("replay snapshot", lambda: snaps.checkpoint(sample_rng))
    return finish_run(exp, cfg, spec, learner, counters, interrupted, log=log)
