"""``python main.py sweep``: a grid of trainings run as Ray Tune trials.

The grid is tasks × seeds × cores × the values of each ``--grid OPTION=V1,V2`` option; train
options after ``--`` apply to every trial.  One Tune trial is one full training run, exactly
what ``train-neurogym`` with the same options would do, with its own experiment directory under
``<sweeps-dir>/<sweep-name>/experiments/``.  Its resources are a placement group: one CPU for a
single-process run (``--num-actors 0``), else one bundle for the learner (and a GPU where the
cluster has one and ``--device`` allows it) and one CPU per actor, spread over the nodes, so
Tune runs as many trials at once as the cluster holds.

Layout of ``<sweeps-dir>/<sweep-name>/``: ``sweep.json`` (the grid; a second run of the same
command resumes, another grid under the same name is refused), ``tune/`` (Tune's experiment
state), ``experiments/<trial>/`` (each run, with ``train.log``), and the results
(``results.json``, ``results.md``, ``learning_curves.png``, see :mod:`driver.observe.results`) unless
``--results-dir`` puts them elsewhere.  After the sweep's driver is killed, the same command
continues: finished trials are kept, an interrupted one continues from its newest checkpoint
(with the rest of its time limit) or starts again.

On a multi-node cluster every node writes its trials' experiment directories, so
``--sweeps-dir`` must be a path all nodes share.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from mpn_dqn.common.config import CORES, ConfigError, TrainConfig, check_experiment_name

# options a sweep sets itself for every trial: not allowed after `--` or in --grid
RESERVED = {"env-name", "seed", "core", "experiment-name", "experiments-dir", "overwrite", "address"}


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message says what to change."""


class _TrainParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise SweepError(f"train option: {message}")


def _train_parser() -> argparse.ArgumentParser:
    p = _TrainParser(prog="train-neurogym", allow_abbrev=False, add_help=False)
    TrainConfig.add_arguments(p)
    return p


def _bool_options() -> set[str]:
    return {a.dest.replace("_", "-") for a in _train_parser()._actions
            if isinstance(a, argparse.BooleanOptionalAction)}


@dataclass(frozen=True)
class Trial:
    """One training run of the grid."""
    env_name: str
    seed: int
    core: str
    grid_args: tuple[str, ...]           # the --grid values of this trial, as train options
    train_args: tuple[str, ...]          # the options after `--` (every trial)

    @property
    def variant(self) -> str:
        opts = " ".join((*self.train_args, *self.grid_args))
        return opts or "defaults"

    @property
    def experiment_name(self) -> str:
        parts = [self.env_name.removesuffix("-v0"), self.core]
        words = list(self.grid_args)
        while words:                               # --n-step 1 -> n-step1, --no-x -> no-x
            opt = words.pop(0).removeprefix("--")
            val = words.pop(0) if words and not words[0].startswith("--") else ""
            parts.append(opt + "".join(c if c.isalnum() or c in "._" else "-" for c in val))
        name = "-".join(parts + [f"s{self.seed}"])
        if len(name) > 120:                        # many grid options: keep it a usable name
            name = f"{'-'.join(parts[:2])}-g{zlib.crc32(' '.join(self.grid_args).encode()) % 10**6:06d}-s{self.seed}"
        return name

    def argv(self, experiments_dir: str) -> list[str]:
        return ["--env-name", self.env_name, "--seed", str(self.seed), "--core", self.core,
                "--experiments-dir", experiments_dir, "--experiment-name", self.experiment_name,
                *self.train_args, *self.grid_args]

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(d["env_name"], int(d["seed"]), d["core"], tuple(d["grid_args"]), tuple(d["train_args"]))

    def config(self, experiments_dir: str, auto_actors: int | None = None) -> TrainConfig:
        """The run's TrainConfig; ``auto_actors`` replaces ``--num-actors auto`` (the sweep's
        driver resolves it once, so every trial of a grid asks for the same resources)."""
        ns = _train_parser().parse_args(self.argv(experiments_dir))
        try:
            cfg = TrainConfig.from_namespace(ns)
        except (ConfigError, TypeError, ValueError) as exc:
            raise SweepError(f"{self.experiment_name}: {exc}") from exc
        if cfg.num_actors is None and auto_actors is not None:
            cfg.num_actors = auto_actors
        cfg.num_actors = cfg.effective_num_actors
        return cfg


@dataclass
class SweepSpec:
    """What to run; validated at construction (nothing is written before it passes)."""
    name: str
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    cores: list[str] = field(default_factory=lambda: ["mpn"])
    grid: dict[str, list[str]] = field(default_factory=dict)
    train_args: list[str] = field(default_factory=list)
    sweeps_dir: str = "sweeps"
    address: str | None = None
    max_concurrent: int | None = None
    results_dir: str | None = None
    title: str = "Results"
    skip_existing: bool = False

    def __post_init__(self):
        try:
            check_experiment_name(self.name)
        except ConfigError as exc:
            raise SweepError(f"--sweep-name: {exc}") from exc
        if not self.tasks:
            raise SweepError("no task: pass --env-name T [T ...] or --battery")
        for what, xs in (("--env-name", self.tasks), ("--seeds", self.seeds), ("--cores", self.cores)):
            if len(set(xs)) != len(xs):
                raise SweepError(f"{what} lists a value twice: {' '.join(map(str, xs))}")
        from mpn_dqn.common.tasks import UnknownTaskError, check_task_name
        for t in self.tasks:
            try:
                check_task_name(t)
            except UnknownTaskError as exc:
                raise SweepError(str(exc)) from exc
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise SweepError(f"--seeds must be one or more integers >= 0, got {self.seeds}")
        bad = [c for c in self.cores if c not in CORES]
        if not self.cores or bad:
            raise SweepError(f"--cores: choose from {', '.join(CORES)}, got {' '.join(self.cores) or 'none'}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SweepError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        known = {a.dest.replace("_", "-") for a in _train_parser()._actions}
        for opt, values in self.grid.items():
            if opt in RESERVED:
                raise SweepError(f"--grid {opt}: the sweep sets --{opt} itself "
                                 f"(use --env-name/--seeds/--cores of sweep for the grid's tasks, seeds, cores)")
            if opt not in known:
                import difflib
                close = difflib.get_close_matches(opt, sorted(known), n=1)
                raise SweepError(f"--grid {opt}: not a train-neurogym option"
                                 + (f"; did you mean {close[0]}?" if close else " (see train-neurogym --help)"))
            if not values or len(set(values)) != len(values):
                raise SweepError(f"--grid {opt}: give distinct values, e.g. --grid {opt}=A,B")
        used = {a.lstrip("-").split("=")[0] for a in self.train_args if a.startswith("--")}
        used |= {u.removeprefix("no-") for u in used}
        clash = sorted(used & RESERVED) or sorted(used & set(self.grid))
        if clash:
            raise SweepError(f"--{clash[0]} after `--`: the sweep sets it itself or --grid varies it; "
                             "remove it there")
        self._trials = list(self._expand())
        # every trial's options parse and validate; "auto" actors resolved as on this machine
        self._configs = {t: t.config(str(self.experiments_dir)) for t in self._trials}
        self.skipped: list[Trial] = []
        if self.skip_existing:
            if not self.results_dir:
                raise SweepError("--skip-existing needs --results-dir: the results.json whose "
                                 "finished rows the sweep leaves out")
            from mpn_dqn.driver.experiment import machine
            from mpn_dqn.driver.observe.results import variant_of
            done, here = self._finished_rows(), machine()
            for t in self._trials:
                cfg = self._configs[t]
                if (cfg.env_name, cfg.dt, cfg.core, cfg.seed,
                        variant_of({"config": cfg.to_dict(), "machine": here})) in done:
                    self.skipped.append(t)
            self._trials = [t for t in self._trials if t not in self.skipped]

    def _finished_rows(self) -> set[tuple]:
        """(task, dt, core, seed, variant) of every row of --results-dir with an evaluation."""
        from mpn_dqn.driver.observe.results import load_rows, variant_of
        try:
            rows = load_rows(Path(self.results_dir) / "results.json")
        except (OSError, ValueError) as exc:
            raise SweepError(f"--results-dir: {exc}; choose another directory") from exc
        return {(r.get("task"), r.get("dt"), r.get("core"), r.get("seed"), variant_of(r))
                for r in rows if r.get("status") == "ok"}

    def config_of(self, trial: Trial) -> TrainConfig:
        return self._configs[trial]

    # -- the grid ---------------------------------------------------------------------------
    def _expand(self):
        bools = _bool_options()
        dims = []
        for opt, values in self.grid.items():
            choices = []
            for v in values:
                if opt in bools:
                    if v.lower() not in ("true", "false"):
                        raise SweepError(f"--grid {opt}: a switch takes true or false, got {v!r}")
                    choices.append((f"--{opt}",) if v.lower() == "true" else (f"--no-{opt}",))
                else:
                    choices.append((f"--{opt}", v))
            dims.append(choices)
        for task in self.tasks:
            for core in self.cores:
                for combo in itertools.product(*dims):
                    for seed in self.seeds:
                        yield Trial(task, seed, core, tuple(a for c in combo for a in c),
                                    tuple(self.train_args))

    @property
    def trials(self) -> list[Trial]:
        return list(self._trials)

    @property
    def dir(self) -> Path:
        return Path(self.sweeps_dir).resolve() / self.name

    @property
    def experiments_dir(self) -> Path:
        return self.dir / "experiments"

    @property
    def report_dir(self) -> Path:
        return Path(self.results_dir).resolve() if self.results_dir else self.dir

    def identity(self) -> dict:
        """What makes two invocations the same sweep (so that the second resumes the first)."""
        return {"tasks": self.tasks, "seeds": self.seeds, "cores": self.cores, "grid": self.grid,
                "train_args": self.train_args}       # the whole grid: --skip-existing may drop more later


# -- resources -------------------------------------------------------------------------------------

def trial_bundles(cfg: TrainConfig, cluster_gpus: float = 0) -> list[dict]:
    """Placement-group bundles of one trial: the run's own process needs nothing beyond them."""
    learner = {"CPU": 1.0}
    if cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus >= 1):
        learner["GPU"] = 1.0
    if cfg.num_actors == 0:                        # one process: it is the actor and the learner
        return [learner]
    return [{}, learner] + [{"CPU": 1.0} for _ in range(cfg.num_actors)]


def check_fits(spec: SweepSpec, cpus: float, gpus: float) -> None:
    for t in spec.trials:
        cfg = spec.config_of(t)
        need = sum(b.get("CPU", 0) for b in trial_bundles(cfg, gpus))
        if need > cpus:
            raise SweepError(f"trial {t.experiment_name} needs {need:g} CPUs ({cfg.num_actors} actors "
                             f"+ the learner) but the Ray cluster has {cpus:g}; pass fewer actors after "
                             "`--` (e.g. -- --num-actors 1, or --num-actors 0 for single-process runs) "
                             "or add nodes")
        if cfg.device == "cuda" and gpus < 1:
            raise SweepError("--device cuda but the Ray cluster has no GPU; use --device cpu or auto")


# -- one trial (runs inside a Ray worker) -----------------------------------------------------------

def run_trial(config: dict) -> None:
    """Tune trainable: one training run, continued from its experiment directory if one exists."""
    from ray import tune
    import torch
    torch.set_num_threads(1)
    if config.get("cache_dir"):
        os.environ["MPN_DQN_CACHE_DIR"] = config["cache_dir"]
    from mpn_dqn.driver.experiment import Experiment
    from mpn_dqn.driver.observe.results import row_from_experiment
    trial = Trial.from_dict(config["trial"])
    cfg = trial.config(config["experiments_dir"], config["auto_actors"])
    exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
    # a trial of a killed sweep driver may take a moment to be ended by Ray: wait for its lock
    with exp.lock(wait_s=60):
        _train_trial(trial, cfg, exp)
    row = row_from_experiment(exp.dir, variant=trial.variant, commit=config.get("commit"))
    tune.report({k: row[k] for k in ("accuracy", "pct_ceiling", "fix_break_rate", "premature_rate",
                                     "time_to_95_s", "env_steps", "wall_s")
                 if isinstance(row.get(k), (int, float))} | {"status": row["status"]})


def _train_trial(trial: Trial, cfg: TrainConfig, exp) -> None:
    """Train, or continue, the trial's run unless it already ended on its own."""
    if _finished(exp.dir):
        return
    latest = exp.latest_checkpoint() if exp.config_path.exists() else None
    if latest is None:
        exp.create(cfg, overwrite=True)
    log = _file_log(exp.dir / "train.log")
    log(f"sweep trial {trial.experiment_name}: train-neurogym {shlex.join(trial.argv(cfg.experiments_dir))}")
    run_cfg, resume_from = cfg, None
    if latest is not None:
        from mpn_dqn.driver.experiment import NETWORK_FIELDS, REPLAY_FIELDS, check_checkpoint_matches, load_checkpoint
        from mpn_dqn.driver.observe.progress import Counters
        ck = load_checkpoint(latest)
        check_checkpoint_matches(ck, cfg, latest, NETWORK_FIELDS + REPLAY_FIELDS)   # as resume does
        done = Counters.from_dict(ck["counters"])
        resume_from = str(latest)
        if cfg.time_limit_minutes:             # the rest of the trial's time, not a new limit
            left = max(0.01, cfg.time_limit_minutes - done.wall_time / 60.0)
            run_cfg = dataclasses.replace(cfg, time_limit_minutes=left)
        log(f"continuing from {latest.name} (episode {done.episodes}, {done.wall_time:.0f} s done)")
    from mpn_dqn.driver.runtime import train
    train(run_cfg, exp, resume_from=resume_from, log=log)


def _finished(exp_dir: Path) -> bool:
    """The run ended on its own (not interrupted) and wrote its summary."""
    try:
        return not json.loads((exp_dir / "summary.json").read_text()).get("interrupted", True)
    except (OSError, json.JSONDecodeError):
        return False


def _file_log(path: Path):
    def log(msg: str) -> None:
        with open(path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    return log


def _trial_name(trial) -> str:
    return Trial.from_dict(trial.config["trial"]).experiment_name


def _trial_resources(config: dict):
    from ray import tune
    cfg = Trial.from_dict(config["trial"]).config(config["experiments_dir"], config["auto_actors"])
    bundles = trial_bundles(cfg, config.get("cluster_gpus", 0))
    return tune.PlacementGroupFactory(bundles, strategy="SPREAD")


def _console(msg: str) -> None:
    print(msg, flush=True)


def _progress_callback(total: int, log=_console, report=None):
    """``report(trial_dict)``: called as each trial ends, so that the results table grows while
    the sweep runs (a sweep cut short still leaves the rows of its finished trials)."""
    from ray import tune

    def ended(trials, trial) -> int:
        return 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)

    class Progress(tune.Callback):
        """One line per trial start, end and error on the sweep's console (restored with the
        sweep: it keeps no state)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            log(f"[sweep] started {_trial_name(trial)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            acc = r.get("accuracy")
            pct = r.get("pct_ceiling")
            log(f"[sweep] {ended(trials, trial)}/{total} done: {_trial_name(trial)}: "
                + (f"accuracy {acc:.3f}" if acc is not None else r.get("status", "no result"))
                + (f" ({pct:.1f} % of ceiling)" if pct is not None else "")
                + (f" in {r['wall_s']:.0f} s" if r.get("wall_s") is not None else ""))
            if report is not None:
                report(trial.config["trial"])

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"[sweep] {ended(trials, trial)}/{total} FAILED: {_trial_name(trial)} (see its train.log and "
                f"{getattr(trial, 'path', None) or 'the Tune trial directory'})")
            if report is not None:
                report(trial.config["trial"])
    return Progress()


# -- the sweep -------------------------------------------------------------------------------------

def prepare(spec: SweepSpec) -> None:
    """Checks that need the outside world (task registry, an existing sweep), before writing."""
    from mpn_dqn.common.tasks import TaskError, UnknownTaskError, check_task
    seen = set()
    for t in spec.trials:
        cfg = spec.config_of(t)
        if (cfg.env_name, cfg.dt) in seen:
            continue
        seen.add((cfg.env_name, cfg.dt))
        try:
            check_task(cfg.env_name, cfg.dt)
        except (TaskError, UnknownTaskError) as exc:
            raise SweepError(str(exc)) from exc
    import ray
    if not (spec.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        # the embedded Ray will get this machine's CPUs: refuse what cannot fit before starting it
        check_fits(spec, float(os.cpu_count() or 1), 0.0)
    meta = spec.dir / "sweep.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SweepError(f"cannot read {meta}: {exc}; remove the sweep directory or choose "
                             "another --sweep-name") from exc
        if old.get("identity") != json.loads(json.dumps(spec.identity())):
            raise SweepError(f"sweep {spec.name!r} exists in {spec.sweeps_dir}/ with another grid; "
                             "choose another --sweep-name (the same command again resumes it)")
    if spec.results_dir and Path(spec.results_dir).exists() and not Path(spec.results_dir).is_dir():
        raise SweepError(f"--results-dir {spec.results_dir} is not a directory")
    if spec.results_dir:
        from mpn_dqn.driver.observe.results import load_rows
        try:
            load_rows(Path(spec.results_dir) / "results.json")
        except (ValueError, json.JSONDecodeError) as exc:
            raise SweepError(f"--results-dir: {exc}; choose another directory") from exc


class _Reporter:
    """Results rows of a sweep's trials, merged into the report as each trial ends."""

    def __init__(self, spec: SweepSpec, commit: str, command: str | None):
        self.experiments_dir, self.report_dir = spec.experiments_dir, spec.report_dir
        self.name, self.title, self.commit, self.command = spec.name, spec.title, commit, command

    def row(self, t: Trial) -> dict | None:
        from mpn_dqn.driver.observe.results import row_from_experiment
        exp_dir = self.experiments_dir / t.experiment_name
        if not (exp_dir / "config.json").exists():
            return None
        return row_from_experiment(exp_dir, variant=t.variant, commit=self.commit,
                                   extra={"sweep": self.name, "grid": " ".join(t.grid_args)})

    def __call__(self, trial: dict) -> None:
        from mpn_dqn.driver.observe.results import write_report
        row = self.row(Trial.from_dict(trial))
        if row is not None:
            write_report(self.report_dir, [row], title=self.title, command=self.command)


def run_sweep(spec: SweepSpec, *, log=print, command: str | None = None) -> dict:
    """Run (or resume) the sweep; returns what was written and the trial counts."""
    import ray
    from ray import tune
    from mpn_dqn.common.ceiling import ceiling_for
    from mpn_dqn.driver.runtime.ray_cluster import init_ray, shutdown_after
    from mpn_dqn.driver.observe.results import git_commit, write_report
    trials = spec.trials
    if spec.skipped:
        log(f"Sweep {spec.name}: leaving out {len(spec.skipped)} trials that have a finished row in "
            f"{spec.report_dir / 'results.json'} (--skip-existing)")
    if not trials:
        log(f"Sweep {spec.name}: nothing left to run")
        return {"trials": 0, "ok": 0, "sweep_dir": str(spec.dir), "results_md": None}
    prepare(spec)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")    # Tune's console tables off: one line per trial
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # the embedded Ray gets this machine's CPUs, no more: trials that do not fit are refused
    from mpn_dqn.driver.runtime.ray_cluster import ClusterError
    try:
        started = init_ray(TrainConfig(env_name=spec.tasks[0], num_actors=0, address=spec.address), log)
    except ClusterError as exc:
        raise SweepError(str(exc)) from exc
    with shutdown_after(started):
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        check_fits(spec, cpus, gpus)
        auto = TrainConfig(env_name=spec.tasks[0]).effective_num_actors   # what the trials' "auto" is
        meta = spec.dir / "sweep.json"
        resuming = meta.exists()
        commit = git_commit()
        spec.experiments_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            meta.write_text(json.dumps({"name": spec.name, "identity": spec.identity(),
                                        "command": command, "created": time.strftime("%Y-%m-%d %H:%M"),
                                        "commit": commit}, indent=1) + "\n")
        for env_name, dt in sorted({(c.env_name, c.dt) for c in map(spec.config_of, trials)}):
            c = ceiling_for(env_name, dt)         # measured once per task and dt, cached
            log(f"Ceiling of {env_name} at dt {dt}: {c['ceiling']:.3f} ({c['ceiling_source']}); "
                f"best trivial {c['best_trivial']['accuracy']:.3f}")
        report = _Reporter(spec, commit, command)
        base = {"experiments_dir": str(spec.experiments_dir), "commit": commit, "cluster_gpus": gpus,
                "auto_actors": auto,
                "cache_dir": os.environ.get("MPN_DQN_CACHE_DIR")}
        space = {**base, "trial": tune.grid_search([{**dataclasses.asdict(t)} for t in trials])}
        trainable = tune.with_resources(run_trial, _trial_resources)
        tune_dir = spec.dir / "tune"
        finished = sum(_finished(spec.experiments_dir / t.experiment_name) for t in trials)
        grid = len(trials) + len(spec.skipped)
        log(f"Sweep {spec.name}: {len(trials)} trials" + (f" of {grid}" if spec.skipped else "")
            + f" ({len(spec.tasks)} tasks x {len(spec.cores)} cores "
            f"x {grid // max(1, len(spec.tasks) * len(spec.cores) * len(spec.seeds))} variants "
            f"x {len(spec.seeds)} seeds) on {cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
            + f"; directory {spec.dir}")
        if resuming and tune.Tuner.can_restore(str(tune_dir)):
            log(f"Resuming sweep {spec.name} from {tune_dir}: {finished} of {len(trials)} trials "
                "already finished")
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=True, param_space=space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent,
                                            trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name="tune", storage_path=str(spec.dir), verbose=0,
                                          callbacks=[_progress_callback(len(trials), report=report)],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
    rows = [r for r in (report.row(t) for t in trials) if r is not None]
    ok = sum(r.get("status") == "ok" for r in rows)
    out = write_report(spec.report_dir, rows, title=spec.title, command=command)
    log(f"Sweep {spec.name}: {ok} of {len(trials)} trials finished with an evaluation; "
        f"results in {out['results_md']}")
    out.update(trials=len(trials), ok=ok, sweep_dir=str(spec.dir))
    return out


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python main.py " + shlex.join(args)
