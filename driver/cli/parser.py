"""The command line: ``python main.py <command> [options]`` (also installed as ``mpn-dqn``).

``train-neurogym``'s options are generated from :class:`common.config.TrainConfig` (one
dataclass = the CLI).  Misuse (unknown command or option, bad value, unknown task or
experiment) prints one line saying what to do and exits with code 2, before anything is
written.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from mpn_dqn.common.config import ConfigError, TrainConfig, random_experiment_name
from mpn_dqn.driver.cli.preflight import (UsageError, capacity_preflight, task_and_device_preflight,
                                  writable_dir)

EXIT_USAGE = 2
MAX_EVAL_EPISODES = 10_000


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and close-match hints for misspelt options)."""

    def error(self, message: str):  # type: ignore[override]
        if "unrecognized arguments" in message:
            bad = [w for w in message.split(":", 1)[1].split() if w.startswith("--")]
            known = [s for a in self._actions for s in a.option_strings]
            hints = []
            for b in bad:
                close = difflib.get_close_matches(b.split("=")[0], known, n=2)
                if close:
                    hints.append(f"{b} -> did you mean {' or '.join(close)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _experiment_args(p: argparse.ArgumentParser, what: str,
                     dir_help: str = "(default: experiments)") -> None:
    """The ``--experiment-name`` (required; help ``what``) and ``--experiments-dir`` pair."""
    p.add_argument("--experiment-name", required=True, help=what)
    p.add_argument("--experiments-dir", default="experiments", help=dir_help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpn-dqn", allow_abbrev=False,
                description="MPN-DQN on NeuroGym tasks: distributed actor-learner training on Ray.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p.command_parsers = sub.choices      # name -> subparser (for errors about its options)

    t = sub.add_parser("train-neurogym", allow_abbrev=False,
                       help="train an agent on a NeuroGym task",
                       description="Train MPN-DQN on a NeuroGym task. Every option below is a field "
                       "of common.config.TrainConfig and is saved in experiments/<name>/config.json.")
    TrainConfig.add_arguments(t)

    e = sub.add_parser("eval", allow_abbrev=False, help="greedy evaluation of a trained experiment",
                       description="Run the trained policy greedily and report accuracy against the "
                       "ideal-observer ceiling, with a progress line every few seconds while it runs; "
                       "writes experiments/<name>/eval.json.")
    _experiment_args(e, "experiment to evaluate")
    e.add_argument("--num-eval-episodes", type=int, default=50,
                   help="episodes to run (at most 10000); each has the experiment's "
                   "--trials-per-episode trials (default: 50)")
    e.add_argument("--checkpoint", default=None,
                   help="checkpoint file name or path (default: selected_model.pt — the final or the best "
                        "model, whichever was better on validation seeds — else final_model.pt, "
                        "else best_model.pt)")
    e.add_argument("--seed", type=int, default=0, help="evaluation seed (default: 0)")

    r = sub.add_parser("render", allow_abbrev=False, help="render one episode as an animated GIF",
                       description="Render one greedy episode: observations, actions vs ground truth, "
                       "Q-values and the recurrent state as a heatmap, trial boundaries marked.")
    _experiment_args(r, "experiment to render")
    r.add_argument("--output", required=True, help="output .gif path")
    r.add_argument("--checkpoint", default=None, help="checkpoint (default: final_model.pt)")
    r.add_argument("--seed", type=int, default=0, help="episode seed (default: 0)")
    r.add_argument("--max-trials", type=int, default=None,
                   help="trials to render (default: one episode)")
    r.add_argument("--fps", type=int, default=8, help="frames per second (default: 8)")

    an = sub.add_parser("analyze", allow_abbrev=False, help="record and analyse a trained agent's trials",
                        description="Run the trained policy greedily (M kept across the trials of an "
                        "episode, as in training) and write experiments/<name>/analysis/: trials.npz "
                        "(per step: observation, action, ground truth, reward, Q, h, M, period; per "
                        "trial: NeuroGym's trial conditions, outcome, episode position; see "
                        "docs/analysis.md), summary.json, and figures: psychometric curve beside the "
                        "ideal observer's (tasks with a signed coherence), PCA of h and M, decoding of "
                        "trial variables over time from h and M with a shuffled control, cross-temporal "
                        "decoding. Figures that do not apply to the task are skipped with the reason.")
    _experiment_args(an, "experiment to analyse")
    an.add_argument("--checkpoint", default=None,
                    help="checkpoint file name or path (default: as eval: selected_model.pt, else "
                         "final_model.pt, else best_model.pt)")
    an.add_argument("--num-trials", type=int, default=500, help="greedy trials to record (default: 500)")
    an.add_argument("--seed", type=int, default=0, help="seed of the recorded trials (default: 0)")

    s = sub.add_parser("resume", allow_abbrev=False, help="continue a run from its last checkpoint",
                       description="Continue an experiment from its newest checkpoint (model, "
                       "optimizer, target network, counters, epsilon schedule) and its replay "
                       "snapshot (replay contents, rate-limiter counters, sampling RNG), e.g. "
                       "after the run was killed; writes resume.json. Before it changes anything it "
                       "checks that the options of config.json that shape the network and the replay "
                       "snapshot match the checkpoint's and that its num_actors fits this machine's "
                       "CPUs (or the cluster); a refusal is one line, exit 2.")
    _experiment_args(s, "experiment to continue")
    s.add_argument("--num-episodes", type=int, default=None,
                   help="new total number of episodes (default: the original --num-episodes; "
                   "with neither option the run continues to its original budget)")
    s.add_argument("--time-limit-minutes", type=float, default=None,
                   help="stop after this many minutes of this session (default: what is left of the "
                   "original --time-limit-minutes, none when --num-episodes is given)")
    s.add_argument("--checkpoint", default=None,
                   help="checkpoint file name (in the experiment's checkpoints/) or path to continue "
                        "from (default: the newest one that loads; a damaged newer one is skipped "
                        "with a warning)")
    c = sub.add_parser("scale", allow_abbrev=False, help="add or remove actors of a running Ray job",
                       description="Change the number of actors of a running distributed job without "
                       "stopping it: the learner and the replay server (and its contents) are untouched; "
                       "new actors start with the current weights, removed ones finish their chunk "
                       "first. The request goes through experiments/<name>/control.json; the driver "
                       "answers in control_result.json within about a second. Exit 0: applied; 2: "
                       "refused (e.g. not enough free CPUs in the cluster), or the experiment does not "
                       "exist or is not running; 1: no answer in time.")
    _experiment_args(c, "the running experiment",
                     "its experiments directory, as the driver sees it (default: experiments)")
    c.add_argument("--num-actors", type=int, required=True, help="the new number of actors (>= 1)")
    c.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the driver's answer (default: 30)")

    g = sub.add_parser("ceiling", allow_abbrev=False,
                       help="what a perfect and a trivial agent score on a task",
                       description="Run scripted policies on a task and print their accuracy "
                       "with standard errors: random actions, the ground-truth oracle, always "
                       "fixating, and fixating then always giving the most frequent answer; "
                       "beside them the observation-only ideal observer where one is known. The "
                       "ceiling is the ideal observer, else the oracle; an agent must beat the "
                       "best trivial policy to have learned anything.")
    g.add_argument("--env-name", required=True, help="NeuroGym task name")
    g.add_argument("--dt", type=int, default=None,
                   help="time step in ms (default: the task's own registered dt)")
    g.add_argument("--trials", type=int, default=2000,
                   help="trials per policy (default: 2000; stderr ~0.011 at accuracy 0.5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the envs and the random policy "
                   "(default: 0)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    sw = sub.add_parser("sweep", allow_abbrev=False, help="a grid of trainings run as Ray Tune trials",
                        description="Train every combination of tasks x cores x --grid values x seeds, "
                        "each trial one full train-neurogym run with its own resources (one CPU per "
                        "actor plus the learner's; one CPU for --num-actors 0), as many at once as the "
                        "Ray cluster holds: the embedded local Ray (this machine's CPUs), or a cluster "
                        "with --address. Writes <sweeps-dir>/<sweep-name>/: sweep.json, tune/ (Ray "
                        "Tune's state), experiments/<trial>/ (each run, with train.log; eval, render, "
                        "watch take --experiments-dir <sweeps-dir>/<sweep-name>/experiments), and "
                        "results.json, results.md (task, core, seed, accuracy +- stderr, % of "
                        "ceiling, fixation breaks, premature responses, time to 95 % of the ceiling, "
                        "env steps, wall time, git commit, the full config; the battery at the "
                        "defaults with MPN and GRU side by side, then every variant) and "
                        "learning_curves.png (each core and variant, the defaults drawn boldly: mean "
                        "over seeds with a min-max band). Run the same command again to resume "
                        "a sweep whose driver was stopped or killed: finished trials are kept, "
                        "interrupted ones continue from their newest checkpoint. On a multi-node "
                        "cluster --sweeps-dir must be a path every node shares. Example: "
                        "python main.py sweep --battery --seeds 0 1 2 --cores mpn gru --results-dir "
                        "docs")
    sw.add_argument("--env-name", nargs="+", default=[], metavar="TASK", help="NeuroGym tasks")
    sw.add_argument("--battery", action="store_true",
                    help="the 18 NeuroGym tasks of the Multi-Plasticity Network paper (common.tasks.BATTERY)")
    sw.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="(default: 0)")
    sw.add_argument("--cores", nargs="+", default=["mpn"], metavar="CORE",
                    help="recurrent cores: mpn, gru, lstm (default: mpn)")
    sw.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                    help="one more grid dimension: a train-neurogym option and its values, e.g. "
                         "--grid bptt-chunk-size=20,40 or --grid learn-plasticity=true,false; repeatable")
    sw.add_argument("--sweep-name", default=None,
                    help="directory name under --sweeps-dir (default: a random name)")
    sw.add_argument("--sweeps-dir", default="sweeps", help="(default: sweeps)")
    sw.add_argument("--address", default=None,
                    help="Ray cluster to run on (default: RAY_ADDRESS, else an embedded local Ray)")
    sw.add_argument("--max-concurrent", type=int, default=None,
                    help="at most this many trials at once (default: as many as the cluster holds)")
    sw.add_argument("--results-dir", default=None,
                    help="where results.json/.md and learning_curves.png go (default: the sweep's "
                         "directory); rows are merged into an existing results.json there, a row "
                         "replacing one of the same task, dt, core, seed and variant (the options in "
                         "which its config differs from the defaults)")
    sw.add_argument("--title", default="Results", help="title of results.md (default: Results)")
    sw.add_argument("--skip-existing", action="store_true",
                    help="leave out every trial whose task, dt, core, seed and variant already has a "
                         "row with an evaluation in --results-dir's results.json (needs --results-dir), "
                         "so a large grid can be run in parts: the same command again, in another "
                         "sweep directory, runs only what is missing")
    sw.add_argument("--dry-run", action="store_true",
                    help="print the trials and the resources each asks for, and exit")
    sw.add_argument("train_options", nargs="*", metavar="-- TRAIN-OPTION",
                    help="train-neurogym options for every trial, after `--` (e.g. -- "
                         "--time-limit-minutes 5 --hidden-dim 64)")

    pl = sub.add_parser("plot", allow_abbrev=False, help="draw a run's training curves",
                        description="Write experiments/<name>/plots/training_curves.png from its "
                        "metrics.jsonl (also while the run goes on): accuracy as % of the ceiling "
                        "beside the best trivial policy, fixation breaks and premature responses, TD "
                        "loss against env steps; accuracy, epsilon and throughput against wall time.")
    _experiment_args(pl, "experiment to plot")

    rs = sub.add_parser("results", allow_abbrev=False, help="rebuild results.md and the curves from results.json",
                        description="Regenerate <results-dir>/results.md and learning_curves.png "
                        "from the rows in <results-dir>/results.json "
                        "(written by sweep), with % of ceiling against the ceilings as `ceiling` "
                        "measures them now and each row's variant against today's defaults: the "
                        "options in which its stored config differs from them (`defaults`: none).")
    rs.add_argument("--results-dir", default="docs", help="(default: docs)")
    rs.add_argument("--title", default="Results", help="title of results.md (default: Results)")

    w = sub.add_parser("watch", allow_abbrev=False, help="live terminal view of a run",
                       description="Refreshing view of a run from its experiment directory: latest "
                       "values and trends (sparklines over the last records) of accuracy, loss, Q, "
                       "throughput, replay and policy lag, the actor count, whether the job is alive "
                       "(heartbeat.json) and the last scale request. Ends when the run ends, or Ctrl-C.")
    _experiment_args(w, "experiment to watch")
    w.add_argument("--once", action="store_true", help="print one screen and exit")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    return p


def _positive(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def cmd_train(ns) -> int:
    try:
        cfg = TrainConfig.from_namespace(ns)
    except (ConfigError, TypeError) as exc:
        raise UsageError(f"train-neurogym: {exc}") from exc
    task_and_device_preflight(cfg)
    from mpn_dqn.driver.experiment import Experiment
    name = cfg.experiment_name or random_experiment_name()
    cfg.experiment_name = name
    cfg.num_actors = cfg.effective_num_actors        # "auto" resolved and recorded in config.json
    exp = Experiment(cfg.experiments_dir, name)
    exp.check_free()                                # a live run of this name: exit 2, naming it
    Experiment.check_new(cfg.experiments_dir, name, cfg.overwrite)
    writable_dir(cfg.experiments_dir)
    from mpn_dqn.driver.runtime.ray_cluster import shutdown_after
    started = capacity_preflight(cfg)             # actors that cannot be placed: exit 2
    # exp.lock(): a live run of the same name (e.g. under --overwrite) exits 2
    with shutdown_after(started), exp.lock():
        return _train_new(cfg, exp)


def _train_new(cfg: TrainConfig, exp) -> int:
    exp.create(cfg, overwrite=cfg.overwrite)
    print(f"Experiment: {exp.dir}  (task {cfg.env_name}, dt {cfg.dt}, core {cfg.core}, "
          f"{'single process' if cfg.num_actors == 0 else f'{cfg.num_actors} Ray actor' + ('s' if cfg.num_actors != 1 else '')})", flush=True)
    from mpn_dqn.common.ceiling import ceiling_for
    ceil = ceiling_for(cfg.env_name, cfg.dt)          # measured once per task and dt, cached
    print(f"Ceiling: {ceil['ceiling']:.3f} ({ceil['ceiling_source']}); best trivial policy "
          f"({ceil['best_trivial']['policy']}) {ceil['best_trivial']['accuracy']:.3f}", flush=True)
    from mpn_dqn.driver.runtime import train
    return _exit_code(train(cfg, exp))


def _exit_code(summary: dict) -> int:
    """0, or 128 + the signal's number when a signal stopped the run (after its final checkpoint)."""
    import signal
    name = (summary or {}).get("signal")
    return 128 + int(signal.Signals[name]) if name else 0


def _open(ns):
    from mpn_dqn.driver.experiment import Experiment, ExperimentError
    try:
        return Experiment.open_existing(ns.experiments_dir, ns.experiment_name)
    except (ExperimentError, ConfigError) as exc:
        raise UsageError(f"{ns.command}: {exc}") from exc


def cmd_eval(ns) -> int:
    _positive("--num-eval-episodes", ns.num_eval_episodes, allow_none=False)
    if ns.num_eval_episodes > MAX_EVAL_EPISODES:
        raise UsageError(f"eval: --num-eval-episodes {ns.num_eval_episodes} is more than "
                         f"{MAX_EVAL_EPISODES}; the accuracy's stderr is already < 0.002 there")
    exp = _open(ns)
    from mpn_dqn.driver.cli.commands import run_eval
    import functools
    run_eval(exp, num_episodes=ns.num_eval_episodes, checkpoint=ns.checkpoint, seed=ns.seed,
             log=functools.partial(print, flush=True))
    return 0


def cmd_render(ns) -> int:
    _positive("--max-trials", ns.max_trials)
    _positive("--fps", ns.fps, allow_none=False)
    if not ns.output.lower().endswith(".gif"):
        raise UsageError(f"render: --output must end in .gif, got {ns.output!r}")
    out_dir = os.path.dirname(os.path.abspath(ns.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"render: the directory of --output {ns.output!r} does not exist")
    exp = _open(ns)
    from mpn_dqn.driver.cli.commands import run_render
    run_render(exp, output=ns.output, checkpoint=ns.checkpoint, seed=ns.seed,
               max_trials=ns.max_trials, fps=ns.fps)
    return 0


def cmd_resume(ns) -> int:
    _positive("--num-episodes", ns.num_episodes)
    exp = _open(ns)
    from mpn_dqn.driver.cli.commands import run_resume
    summary = run_resume(exp, num_episodes=ns.num_episodes, time_limit_minutes=ns.time_limit_minutes,
                         checkpoint=ns.checkpoint)
    return _exit_code(summary)


def cmd_scale(ns) -> int:
    _positive("--num-actors", ns.num_actors, allow_none=False)
    exp = _open(ns)
    from mpn_dqn.driver.runtime.live import ScaleError, check_scalable, send_scale_request, wait_scale_result
    try:
        hb = check_scalable(exp.dir)
    except ScaleError as exc:
        raise UsageError(f"scale: {exc}") from exc
    rid = send_scale_request(exp.dir, ns.num_actors)
    print(f"Scale request {rid}: {hb.get('num_actors', '?')} -> {ns.num_actors} actors for {exp.name} "
          f"(driver pid {hb.get('pid')} on {hb.get('host')}); waiting up to {ns.wait:g}s", flush=True)
    res = wait_scale_result(exp.dir, rid, ns.wait)
    if res is None:
        print(f"scale: no answer from the driver within {ns.wait:g}s; the request stays in "
              f"{exp.dir / 'control.json'} and is applied when the driver reads it", file=sys.stderr)
        return 1
    if res.get("status") != "applied":
        print(f"scale: refused: {res.get('reason')}", file=sys.stderr)
        return EXIT_USAGE
    print(f"Applied at episode {res.get('episode')}: {res.get('num_actors_before')} -> "
          f"{res.get('num_actors')} actors" + (f" ({res['reason']})" if res.get("reason") else ""))
    return 0


def cmd_ceiling(ns) -> int:
    _positive("--trials", ns.trials, allow_none=False)
    _positive("--dt", ns.dt)
    if ns.seed < 0:
        raise UsageError(f"ceiling: --seed must be >= 0, got {ns.seed}")
    from mpn_dqn.common.tasks import TaskError, UnknownTaskError, check_task, native_dt
    try:
        dt = ns.dt if ns.dt is not None else native_dt(ns.env_name)
        check_task(ns.env_name, dt)
    except (TaskError, UnknownTaskError) as exc:
        raise UsageError(f"ceiling: {exc}") from exc
    from mpn_dqn.common.ceiling import ceiling_for, learnable
    res = ceiling_for(ns.env_name, dt, ns.trials, ns.seed)
    if ns.json:
        import json
        print(json.dumps(res, sort_keys=True))
        return 0
    print(f"{ns.env_name} at dt {dt} ms, {ns.trials} trials per policy")
    names = {"random": "random actions", "oracle": "ground-truth oracle", "fixate": "always fixate",
             "frequent": f"most frequent answer ({res['frequent_answer']})"}
    for p, label in names.items():
        r = res[p]
        print(f"  {label:<28} {r['accuracy']:.3f} ± {r['stderr']:.3f}")
    ideal = res["ideal"]
    print(f"  {'ideal observer':<28} " + (f"{ideal['accuracy']:.3f}" if ideal else
                                           "none known for this task and dt"))
    bt = res["best_trivial"]
    print(f"Ceiling: {res['ceiling']:.3f} ({res['ceiling_source']}); best trivial policy: "
          f"{names[bt['policy']]} {bt['accuracy']:.3f}"
          + ("  -- the ceiling does not rise above it: nothing can be learned as registered"
             if not learnable(res) else ""))
    return 0


def cmd_sweep(ns) -> int:
    from mpn_dqn.driver.runtime.sweep import SweepError, SweepSpec, command_line, run_sweep, trial_bundles
    if ns.battery and ns.env_name:
        raise UsageError("sweep: give --env-name or --battery, not both")
    from mpn_dqn.common.tasks import BATTERY
    grid = {}
    for g in ns.grid:
        opt, sep, values = g.partition("=")
        opt = opt.strip().removeprefix("--")
        if not sep or not opt or opt in grid:
            raise UsageError(f"sweep: --grid {g!r}: write OPTION=V1,V2 (each option once), "
                             "e.g. --grid bptt-chunk-size=20,40")
        grid[opt] = [v.strip() for v in values.split(",") if v.strip()]
    try:
        spec = SweepSpec(name=ns.sweep_name or random_experiment_name(),
                         tasks=list(BATTERY) if ns.battery else ns.env_name, seeds=ns.seeds,
                         cores=ns.cores, grid=grid, train_args=ns.train_options,
                         sweeps_dir=ns.sweeps_dir, address=ns.address,
                         max_concurrent=ns.max_concurrent, results_dir=ns.results_dir, title=ns.title,
                         skip_existing=ns.skip_existing)
        if ns.dry_run:
            if spec.skipped:
                print(f"leaving out {len(spec.skipped)} trials with a finished row in {spec.report_dir}")
            for t in spec.trials:
                cfg = spec.config_of(t)
                cpus = sum(b.get("CPU", 0) for b in trial_bundles(cfg))
                print(f"{t.experiment_name}: dt {cfg.dt}, {cfg.num_actors} actors, {cpus:g} CPUs; "
                      f"{t.variant}")
            print(f"{len(spec.trials)} trials; sweep directory {spec.dir}")
            return 0
        out = run_sweep(spec, command=command_line(ns.argv))
    except SweepError as exc:
        raise UsageError(f"sweep: {exc}") from exc
    return 0 if out["ok"] == out["trials"] else 1


def cmd_analyze(ns) -> int:
    _positive("--num-trials", ns.num_trials, allow_none=False)
    if ns.num_trials < 20 or ns.num_trials > 100_000:
        raise UsageError(f"analyze: --num-trials must be between 20 and 100000, got {ns.num_trials}")
    if ns.seed < 0:
        raise UsageError(f"analyze: --seed must be >= 0, got {ns.seed}")
    exp = _open(ns)
    from mpn_dqn.driver.observe.analyze import run_analyze
    run_analyze(exp, checkpoint=ns.checkpoint, num_trials=ns.num_trials, seed=ns.seed)
    return 0


def cmd_plot(ns) -> int:
    exp = _open(ns)
    if not exp.metrics_path.exists() or not exp.read_metrics():
        raise UsageError(f"plot: {exp.name} has no metrics records yet ({exp.metrics_path})")
    from mpn_dqn.driver.observe.plots import plot_training
    print(f"Wrote {plot_training(exp)}")
    return 0


def cmd_results(ns) -> int:
    from pathlib import Path
    from mpn_dqn.driver.observe.results import load_rows, write_report
    path = Path(ns.results_dir) / "results.json"
    try:
        rows = load_rows(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"results: {exc}") from exc
    if not rows:
        raise UsageError(f"results: {path} holds no rows (run `sweep --results-dir {ns.results_dir}` first)")
    out = write_report(ns.results_dir, [], title=ns.title)
    print(f"Wrote {out['results_md']} ({out['rows']} rows)" + (f" and {out['plot']}" if out["plot"] else ""))
    return 0


def cmd_watch(ns) -> int:
    if not ns.interval > 0:
        raise UsageError(f"watch: --interval must be > 0, got {ns.interval}")
    exp = _open(ns)
    from mpn_dqn.driver.observe.watch import watch
    return watch(exp.dir, once=ns.once, interval=ns.interval)


COMMANDS = {"train-neurogym": cmd_train, "eval": cmd_eval, "render": cmd_render, "resume": cmd_resume,
            "scale": cmd_scale, "watch": cmd_watch, "ceiling": cmd_ceiling,
            "sweep": cmd_sweep, "analyze": cmd_analyze, "plot": cmd_plot,
            "results": cmd_results}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    parser = build_parser()
    command = None
    try:
        ns, extras = parser.parse_known_args(argv)
        command = getattr(ns, "command", None)
        if extras:
            # Report unknown options from the command's own parser, so that a misspelt option
            # gets a close match among that command's options (the top-level parser has none).
            owner = parser.command_parsers.get(command, parser)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        ns.argv = list(sys.argv[1:] if argv is None else argv)
        if ns.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[ns.command](ns)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        from mpn_dqn.driver.experiment import CheckpointError, ExperimentError
        if isinstance(exc, (CheckpointError, ExperimentError)):
            print(f"mpn-dqn: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError) and exc.errno is not None:
            # a file that cannot be written or read (full disk, read-only, permissions): one line
            where = f" {exc.filename}" if exc.filename else ""
            then = ""
            if command in ("train-neurogym", "resume"):
                then = ", then `resume` continues from the last checkpoint written"
            print(f"mpn-dqn: error: cannot write or read{where}: {exc.strerror}; free space or fix "
                  f"the permissions{then}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
