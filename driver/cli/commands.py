"""``eval``, ``render`` and ``resume`` on an experiment directory."""
from __future__ import annotations

import dataclasses
import time
import warnings

from mpn_dqn.actors.evaluate import evaluate
from mpn_dqn.driver.experiment import (NETWORK_FIELDS, REPLAY_FIELDS, Experiment, check_checkpoint_matches,
                               load_checkpoint, load_policy_params)


EVAL_PROGRESS_S = 3.0      # seconds between eval's progress lines


def run_eval(exp: Experiment, *, num_episodes: int, checkpoint: str | None, seed: int, log=print) -> dict:
    """Greedy evaluation of a checkpoint: a progress line every ``EVAL_PROGRESS_S`` seconds,
    then the table, then ``eval.json``."""
    cfg = exp.load_config()
    spec, params, ck, path = load_policy_params(exp, checkpoint)
    n_trials = num_episodes * cfg.trials_per_episode
    t0 = last = time.time()

    def progress(done: int, need: int, tally) -> None:
        nonlocal last
        now = time.time()
        if done < need and now - last >= EVAL_PROGRESS_S:
            last = now
            log(f"eval: {done}/{need} episodes ({100 * done / need:.0f} %), accuracy so far "
                f"{tally.accuracy:.3f}, {now - t0:.0f} s")

    res = evaluate(spec, params, env_name=cfg.env_name, dt=cfg.dt, num_trials=n_trials,
                   trials_per_episode=cfg.trials_per_episode, seed=seed, progress=progress)
    res["episodes"] = num_episodes
    res["checkpoint"] = path
    res["trained_episodes"] = ck["counters"].get("episodes")
    ideal = res["ideal_accuracy"]
    rows = [
        ("task", f"{cfg.env_name} (dt {cfg.dt})"),
        ("checkpoint", path),
        ("episodes x trials", f"{num_episodes} x {cfg.trials_per_episode} = {res['trials']}"),
        ("accuracy", f"{res['accuracy']:.3f} ± {res['accuracy_stderr']:.3f}"),
        ("ideal observer", f"{ideal:.3f}" if ideal is not None else "unknown for this task/dt"),
        ("% of ideal", f"{res['pct_ideal']:.1f}%" if res["pct_ideal"] is not None else "-"),
        ("ceiling", f"{res['ceiling']:.3f} ({res['ceiling_source']})"),
        ("% of ceiling", f"{res['pct_ceiling']:.1f}%" if res["pct_ceiling"] is not None
         else "- (the ceiling is not above the best trivial policy)"),
        ("best trivial policy", f"{res['best_trivial']['accuracy']:.3f} "
                                f"({res['best_trivial']['policy']})"),
        ("reward per trial", f"{res['reward_per_trial']:.3f}"),
        ("fixation-break rate", f"{res['fix_break_rate']:.3f}"),
        ("premature responses", f"{res['premature_rate']:.3f} of trials (an answer before the "
                                "response window)"),
        ("mean trial length", f"{res['mean_trial_len']:.1f} steps"),
    ]
    width = max(len(k) for k, _ in rows)
    log("+" + "-" * (width + 2) + "+" + "-" * 52)
    for k, v in rows:
        log(f"| {k:<{width}} | {v}")
    log("+" + "-" * (width + 2) + "+" + "-" * 52)
    try:                                   # the table is out first: a failed write loses nothing
        exp.write_json("eval.json", res)
    except OSError as exc:
        from mpn_dqn.driver.experiment import ExperimentError
        raise ExperimentError(f"eval: could not save the result to {exp.dir / 'eval.json'} "
                              f"({exc.strerror or exc}); the table above is the result") from exc
    log(f"Wrote {exp.dir / 'eval.json'}")
    return res


def run_render(exp: Experiment, *, output: str, checkpoint: str | None, seed: int,
               max_trials: int | None, fps: int, log=print) -> str:
    import tempfile
    from pathlib import Path
    from mpn_dqn.common.analysis import load_record, record_trials, save_record
    from mpn_dqn.common.ceiling import ceiling_for
    from mpn_dqn.driver.observe.render import write_gif
    cfg = exp.load_config()
    spec, params, _, path = load_policy_params(exp, checkpoint)
    n_trials = max_trials or cfg.trials_per_episode
    arrays = record_trials(spec, params, cfg.env_name, cfg.dt, num_trials=n_trials,
                           trials_per_episode=max(n_trials, cfg.trials_per_episode), seed=seed, num_envs=1)
    with tempfile.TemporaryDirectory() as tmp:              # the same Record type analyze reads
        rec = load_record(save_record(arrays, Path(tmp) / "episode.npz"))
    ceil = ceiling_for(cfg.env_name, cfg.dt)
    correct = int(rec["trial_correct"].sum())
    title = (f"{cfg.env_name} (dt {cfg.dt} ms, {spec.core}) — {exp.name}: {correct}/{rec.num_trials} "
             f"trials correct; ceiling {ceil['ceiling']:.3f} ({ceil['ceiling_source']})")
    n = write_gif(rec, output, title=title, fps=fps)
    log(f"Wrote {output}: {n} frames, {rec.num_trials} trials, {correct} correct")
    return output


def run_resume(exp: Experiment, *, num_episodes: int | None, time_limit_minutes: float | None,
               checkpoint: str | None = None, log=print) -> dict:
    cfg = exp.load_config()
    latest, ck = _resume_point(exp, checkpoint, log)
    # before anything is rewritten; budget and runtime fields (episodes, minutes, actors, ...) may differ
    check_checkpoint_matches(ck, cfg, latest, NETWORK_FIELDS + REPLAY_FIELDS)
    from mpn_dqn.driver.runtime.recovery import load_resume_snapshot
    for k in range(cfg.replay_shards):      # a damaged replay snapshot: an error naming it, nothing written
        load_resume_snapshot(exp, k)
    done = int(ck["counters"].get("episodes", 0))
    target, time_limit_minutes = resume_budget(cfg, ck["counters"], num_episodes, time_limit_minutes)
    cfg = dataclasses.replace(cfg, num_episodes=target, time_limit_minutes=time_limit_minutes)
    from mpn_dqn.driver.cli.preflight import capacity_preflight
    from mpn_dqn.driver.runtime.ray_cluster import shutdown_after
    started = capacity_preflight(cfg, "resume")     # as train checks it: actors that cannot be placed
    with shutdown_after(started), exp.lock():       # the run is still live: exit 2, nothing touched
        cfg.save(str(exp.config_path))
        budget = [f"to episode {target}"] if target is not None else []
        if time_limit_minutes:
            budget.append(f"for at most {time_limit_minutes:.2f} min")
        log(f"Resuming {exp.name} from {latest.name} (episode {done}) {', '.join(budget)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mpn_dqn.driver.runtime import train
            return train(cfg, exp, resume_from=str(latest), target_episodes=target, log=log)


def resume_budget(cfg, counters: dict, num_episodes: int | None,
                  time_limit_minutes: float | None) -> tuple[int | None, float | None]:
    """(episode target, minutes) of a resumed run.  ``--num-episodes`` alone: that new total, no
    time limit.  Neither: the original run's target and what is left of its time limit.
    A budget already spent, or one that never ends, is a :class:`UsageError`."""
    from mpn_dqn.driver.cli.preflight import UsageError
    done = int(counters.get("episodes", 0))
    target = num_episodes if num_episodes is not None else cfg.num_episodes
    if target is not None and target <= done:
        raise UsageError(f"resume: the checkpoint is at episode {done}; pass --num-episodes "
                         f"greater than that (the new total)")
    if num_episodes is None and time_limit_minutes is None and cfg.time_limit_minutes:
        left = cfg.time_limit_minutes - float(counters.get("wall_time", 0.0)) / 60.0
        if left < 0.01:
            raise UsageError(f"resume: the run has used its {cfg.time_limit_minutes:g} min "
                             "(--time-limit-minutes); pass --time-limit-minutes M (minutes more) "
                             "or --num-episodes N (a new total)")
        time_limit_minutes = left
    if target is None and time_limit_minutes is None:
        raise UsageError("resume: the run has no episode target; pass --time-limit-minutes M or "
                         "--num-episodes N")
    return target, time_limit_minutes


def _resume_point(exp: Experiment, checkpoint: str | None, log) -> tuple:
    """The checkpoint to continue from: ``checkpoint`` if given, else the newest one that loads;
    a damaged newer one is skipped with a warning naming it."""
    from mpn_dqn.driver.experiment import CheckpointError
    if checkpoint is not None:
        path = exp.resolve_checkpoint(checkpoint)
        return path, load_checkpoint(path)
    cands = exp.checkpoints_newest_first()
    if not cands:
        raise CheckpointError(f"experiment {exp.name!r} has no checkpoint to resume from (it stopped "
                              f"before its first one; looked in {exp.checkpoint_dir}); start it "
                              f"again with `train-neurogym --experiment-name {exp.name} --overwrite` "
                              "and the options in its config.json")
    from mpn_dqn.driver.experiment import _checkpoint_episode
    damaged = []
    for i, path in enumerate(cands):
        try:
            ck = load_checkpoint(path)
        except CheckpointError as exc:
            damaged.append(path.name)
            log(f"Warning: {exc}; trying the next older checkpoint")
            continue
        for other in cands[i + 1:]:           # unreadable files rank last: say that they were skipped
            if _checkpoint_episode(other) < 0:
                log(f"Warning: skipped {other.name}, which cannot be loaded (damaged)")
        return path, ck
    raise CheckpointError(f"experiment {exp.name!r}: no checkpoint can be loaded (damaged: "
                          f"{', '.join(damaged)})")

