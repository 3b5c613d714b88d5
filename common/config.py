"""One configuration schema for the whole system; the command line is generated from it.

Every option is a dataclass field whose metadata carries its help text and its allowed
range.  ``__post_init__`` validates every value at construction and raises
:class:`ConfigError` with a message that says how to fix it, so a bad value never reaches
a running component.  The CLI (``driver/cli/parser.py``) turns each field ``foo_bar`` into
``--foo-bar``; ``config.json`` in the experiment directory is ``dataclasses.asdict``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field, fields
from typing import Any, Optional

CORES = ("mpn", "gru", "lstm")
DEVICES = ("auto", "cpu", "cuda")
REPLAY_INITS = ("zero", "stored", "burn-in")
TARGET_UPDATES = ("hard", "polyak")

# What a run did when its config.json was written before an option existed and the option's
# default is not that behaviour (every other missing key: the default is what it did).
ABSENT_KEY_VALUES = {"plasticity_per_unit": False}      # one eta and lambda for the layer


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which option and how to fix it."""


def opt(default: Any, help: str, *, low: float | None = None, high: float | None = None,
        low_open: bool = False, choices: tuple | None = None) -> Any:
    """A config field with its help text and allowed range (used for validation and --help)."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, low_open=low_open,
                                                choices=choices))


def _check_field(obj: Any, f: dataclasses.Field) -> None:
    value = getattr(obj, f.name)
    meta = f.metadata
    flag = "--" + f.name.replace("_", "-")
    if value is None:
        if not _is_optional(f):
            raise ConfigError(f"{flag} must be given (got nothing)")
        return
    base = _base_type(f)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be true or false, got {value!r}")
        return
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{flag} must be a whole number, got {value!r}")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value!r}")
        setattr(obj, f.name, float(value))
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{flag} must be text, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        rel = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"{flag} must be {rel} {low}; got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{flag} must be <= {high}; got {value!r}")


def _is_optional(f: dataclasses.Field) -> bool:
    """Field annotations are strings here (``from __future__ import annotations``)."""
    return "Optional" in str(f.type) or "None" in str(f.type)


def _base_type(f: dataclasses.Field) -> type:
    s = str(f.type).replace("typing.", "")
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if s == name or s == f"Optional[{name}]" or s == f"{name} | None":
            return t
    raise TypeError(f"config field {f.name} has unsupported type {f.type}")


def _none_or(base: type):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return base(text)
    parse.__name__ = base.__name__
    return parse


def random_experiment_name(rng: random.Random | None = None) -> str:
    rng = rng or random.Random()
    adjectives = ("brisk", "calm", "deft", "eager", "fuzzy", "gentle", "keen", "lucid", "merry",
                  "nimble", "plucky", "quiet", "rapid", "steady", "tidy", "vivid", "wry", "zesty")
    nouns = ("axon", "cortex", "dendrite", "gyrus", "neuron", "synapse", "soma", "spike",
             "thalamus", "vesicle", "glia", "myelin", "hebb", "trace", "engram", "plexus")
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}-{rng.randrange(1000):03d}"


@dataclass
class TrainConfig:
    """Everything ``train-neurogym`` needs.  Field ``foo_bar`` is the CLI option ``--foo-bar``."""

    # --- task ---
    env_name: str = opt("ContextDecisionMaking-v0", "NeuroGym task name (any registered task)")
    dt: Optional[int] = opt(
        None, "NeuroGym time step in ms; default: the task's own registered dt (e.g. 100 for "
        "PerceptualDecisionMaking, 10 for PulseDecisionMaking, 80 for ReadySetGo)", low=1)
    num_episodes: Optional[int] = opt(
        None, "episodes to train for (summed over all envs and actors); default: no episode "
        "count, training runs for --time-limit-minutes", low=1)
    trials_per_episode: int = opt(
        10, "trials per episode; the recurrent state (M) persists across trials and resets only "
        "between episodes", low=1)
    seed: int = opt(0, "random seed (envs, exploration, network init)", low=0)
    time_limit_minutes: Optional[float] = opt(
        10.0, "minutes of wall time to train for (the run stops at this limit or at "
        "--num-episodes, whichever comes first); none: no time limit (then --num-episodes is "
        "required)", low=0, low_open=True)

    # --- network ---
    core: str = opt("mpn", "recurrent core: mpn (multi-plasticity network), gru or lstm", choices=CORES)
    hidden_dim: int = opt(128, "hidden units of the recurrent core", low=1, high=8192)
    eta: Optional[float] = opt(
        None, "MPN Hebbian learning rate eta per step (initial value with --learn-plasticity); "
        "default: --eta-per-100ms scaled by dt/100, so M grows at the same rate per unit of task "
        "time at any dt")
    eta_per_100ms: float = opt(
        0.5, "default eta per 100 ms of task time (the initial value when eta is learned; "
        "--eta overrides it)")
    lambda_decay: Optional[float] = opt(
        None, "MPN decay of M per step (initial value with --learn-plasticity); default: "
        "exp(-dt / --m-timescale-ms)", low=0.0, high=1.0)
    m_timescale_ms: float = opt(
        1950.0, "time constant of M's decay in ms of task time (1950 ms: lambda 0.95 at dt 100, "
        "0.9949 at dt 10)", low=0.0, low_open=True)
    learn_plasticity: bool = opt(
        True, "learn eta and lambda by backprop (lambda clamped to [0, --lambda-max], eta floored "
        "at --eta-min-per-100ms); --no-learn-plasticity keeps them fixed (evidence: docs/defaults.md)")
    plasticity_per_unit: bool = opt(
        True, "one eta and one lambda per hidden unit (learned with --learn-plasticity); the "
        "units' time constants of M start spread geometrically from --m-timescale-ms / 10 to "
        "--m-timescale-ms; --no-plasticity-per-unit: one pair for the layer (evidence: "
        "docs/defaults.md)")
    lambda_max: Optional[float] = opt(
        None, "upper bound of a learnable lambda per step; default: exp(-dt / "
        "--m-timescale-max-ms) (0.967 at dt 100, 0.9967 at dt 10)", low=0.0, high=1.0)
    m_timescale_max_ms: float = opt(
        3000.0, "longest time constant of M in ms of task time that a learned lambda may reach "
        "(a clamp; sets --lambda-max unless that is given)",
        low=0.0, low_open=True)
    eta_min_per_100ms: Optional[float] = opt(
        0.1, "floor of a learned eta per 100 ms of task time (a clamp: nothing changes until eta "
        "reaches it, and eta can rise off it); none: no floor")
    input_bias: float = opt(
        1.0, "value of the constant input channel appended to every observation (lets the "
        "network read M when the observation is all zeros; 0 disables it)")
    dueling: bool = opt(False, "dueling Q head (value + advantage streams)")

    # --- exploration (actors) ---
    epsilon_start: float = opt(0.3, "initial exploration rate: the probability of a random action "
                               "per 100 ms of task time (per step at dt 100)", low=0.0, high=1.0)
    epsilon_end: float = opt(0.01, "final exploration rate per 100 ms of task time", low=0.0, high=1.0)
    epsilon_decay_steps: int = opt(100_000, "task time, in units of 100 ms summed over all envs (env "
                                   "steps at dt 100), over which epsilon decays linearly from "
                                   "start to end", low=1)

    # --- replay ---
    buffer_size: int = opt(20_000, "replay capacity in trials (FIFO; evidence: docs/defaults.md)", low=1)
    trial_batch_size: int = opt(32, "trials per learner batch", low=1)
    replay_init: str = opt(
        "stored", "initial recurrent state when replaying a trial: zero, the stored state the "
        "actor acted from, or burn-in over the end of the preceding trial", choices=REPLAY_INITS)
    burn_in_steps: int = opt(10, "steps of the preceding trial replayed without gradient "
                             "(--replay-init burn-in)", low=0)
    learning_starts: int = opt(64, "trials in replay before the first update", low=1)
    replay_ratio: float = opt(
        4.0, "trials sampled by the learner per trial inserted by the actors (samples per "
        "insert)", low=0.0, low_open=True)
    replay_snapshot_every: int = opt(
        50_000, "snapshot the replay buffer (contents, rate-limiter counters, sampling RNG) every "
        "N trials inserted and with every checkpoint, to checkpoints/replay_snapshot.npz "
        "(atomic, SHA-256 checked); a crashed replay server and `resume` restart from it. Each "
        "snapshot writes the whole buffer, so raise N for big buffers; 0: no snapshots", low=0)

    # --- learner ---
    lr: float = opt(1e-3, "Adam learning rate", low=0.0, low_open=True)
    gamma: Optional[float] = opt(
        None, "discount per step; default derives it from --discount-horizon-ms and --dt",
        low=0.0, high=1.0)
    discount_horizon_ms: float = opt(
        10_000.0, "time constant of the discount in ms of task time: gamma = exp(-dt / horizon)",
        low=0.0, low_open=True)
    n_step: Optional[int] = opt(
        None, "n-step returns (bootstrapping never crosses a trial's end); default: "
        "--n-step-ms / dt (5 at dt 100, 50 at dt 10), so credit travels the same task time per "
        "bootstrap at any dt", low=1)
    n_step_ms: float = opt(500.0, "default n-step horizon in ms of task time", low=1.0)
    n_step_cut: str = opt("non-greedy", "where an n-step return may stop early: non-greedy (at "
                          "the first replayed action that is not the online net's greedy action, "
                          "bootstrapping there) or none (plain n-step returns)",
                          choices=("none", "non-greedy"))
    td_step_weighting: str = opt(
        "task-time", "how the TD loss weighs steps: task-time (a trial's last step, its "
        "outcome, weighs 1 and every other step dt/100 ms, so the loss is the same function of "
        "the task at any dt) or uniform (every step 1; the two are identical at dt 100)",
        choices=("task-time", "uniform"))
    bptt_chunk_size: Optional[int] = opt(
        None, "truncated BPTT chunk length in steps, counted from each trial's start (none: the "
        "whole trial); no gradient crosses a chunk boundary", low=1)
    target_update: str = opt("hard", "target network update: hard copy or polyak averaging",
                             choices=TARGET_UPDATES)
    target_update_period: int = opt(250, "updates between hard target copies", low=1)
    polyak_tau: float = opt(0.005, "polyak averaging rate per update", low=0.0, high=1.0,
                            low_open=True)
    grad_clip: float = opt(10.0, "gradient norm clip (0 disables)", low=0.0)
    huber_delta: float = opt(1.0, "Huber loss threshold", low=0.0, low_open=True)
    device: str = opt("auto", "learner device: auto (cuda when present), cuda or cpu",
                      choices=DEVICES)

    # --- runtime ---
    num_actors: Optional[int] = opt(
        None, "Ray actor processes; default: one per CPU of this machine left after the learner "
        "(at least 1); 0 runs everything in one process without Ray (debugging, tests)", low=0)
    envs_per_actor: int = opt(16, "NeuroGym envs stepped in lockstep per actor, sharing one "
                              "batched policy call per step", low=1)
    address: Optional[str] = opt(None, "Ray cluster address (auto or HOST:PORT); default: the "
                                 "RAY_ADDRESS variable, else an embedded local Ray")
    replay_shards: int = opt(1, "replay-server actors: actor i inserts into server i mod N and the "
                             "learner samples whole batches from every server (a prefetch thread "
                             "each), each under its own samples-per-insert rate limit; "
                             "--buffer-size and --learning-starts are split evenly between them. "
                             "More than 1 needs Ray actors (--num-actors >= N)", low=1)

    # --- output ---
    experiment_name: Optional[str] = opt(None, "experiment directory name under "
                                         "--experiments-dir (default: random)")
    experiments_dir: str = opt("experiments", "where experiment directories are written")
    overwrite: bool = opt(False, "allow reusing an existing experiment name (deletes it)")
    print_freq: int = opt(250, "episodes between progress lines / metrics records", low=1)
    record_seconds: float = opt(1.0, "also write a metrics record at least every this many seconds "
                                "of training, between progress lines (0: every --print-freq "
                                "episodes only)", low=0.0)
    checkpoint_freq: int = opt(1000, "episodes between checkpoints", low=1)
    staleness_every: int = opt(0, "single process: every this many learner updates, measure how far "
                               "the state replay starts a trial from is from the state the current "
                               "network would hold there (mean |dQ| over 8 trials; not with burn-in "
                               "replay; 0: off)", low=0)
    checkpoint_minutes: float = opt(1.0, "also checkpoint at least every this many minutes of "
                                    "training (0: every --checkpoint-freq episodes only)", low=0.0)
    eval_trials: int = opt(500, "greedy evaluation trials at the end of training (0: skip)",
                           low=0)
    plot_training: bool = opt(False, "write plots/training_curves.png")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(self, f)
        if self.dt is None:
            from mpn_dqn.common.tasks import TaskError, UnknownTaskError, native_dt
            try:
                self.dt = native_dt(self.env_name)
            except (TaskError, UnknownTaskError) as exc:
                raise ConfigError(str(exc)) from None
        if self.num_episodes is None and self.time_limit_minutes is None:
            raise ConfigError("--num-episodes and --time-limit-minutes are both none: the run "
                              "would never end; give one of them")
        if self.epsilon_end > self.epsilon_start:
            raise ConfigError(f"--epsilon-end ({self.epsilon_end}) must not exceed "
                              f"--epsilon-start ({self.epsilon_start})")
        if self.learn_plasticity and self.effective_lambda > self.effective_lambda_max:
            raise ConfigError(f"--lambda-decay ({self.effective_lambda:.4f}) must be <= --lambda-max "
                              f"({self.effective_lambda_max:.4f}) with --learn-plasticity")
        if (self.learn_plasticity and self.effective_eta_min is not None
                and self.effective_eta < self.effective_eta_min):
            raise ConfigError(f"--eta ({self.effective_eta:.4g} per step) must be >= the floor "
                              f"--eta-min-per-100ms ({self.eta_min_per_100ms}, "
                              f"{self.effective_eta_min:.4g} per step) with --learn-plasticity; "
                              "lower the floor or raise --eta / --eta-per-100ms")
        if self.learning_starts < self.trial_batch_size:
            raise ConfigError(f"--learning-starts ({self.learning_starts}) must be >= "
                              f"--trial-batch-size ({self.trial_batch_size})")
        if self.buffer_size < self.trial_batch_size:
            raise ConfigError(f"--buffer-size ({self.buffer_size}) must hold at least one batch "
                              f"(--trial-batch-size {self.trial_batch_size})")
        if self.learning_starts > self.buffer_size:
            raise ConfigError(f"--learning-starts ({self.learning_starts}) can never be reached "
                              f"with --buffer-size {self.buffer_size}; lower it or grow the buffer")
        if self.replay_shards > 1:
            if self.effective_num_actors < self.replay_shards:
                raise ConfigError(f"--replay-shards {self.replay_shards} needs at least as many Ray "
                                  f"actors (--num-actors, now {self.effective_num_actors}): a server "
                                  "without an actor never receives trials")
            per = self.buffer_size // self.replay_shards
            if per < self.trial_batch_size or -(-self.learning_starts // self.replay_shards) > per:
                raise ConfigError(f"--buffer-size {self.buffer_size} split over --replay-shards "
                                  f"{self.replay_shards} is {per} trials per server: each must hold a "
                                  f"batch (--trial-batch-size {self.trial_batch_size}) and its share of "
                                  f"--learning-starts ({self.learning_starts}); grow --buffer-size")
        if self.experiment_name is not None:
            check_experiment_name(self.experiment_name)

    @property
    def effective_num_actors(self) -> int:
        return self.num_actors if self.num_actors is not None else max(1, (os.cpu_count() or 2) - 1)

    @property
    def effective_eta(self) -> float:
        return self.eta if self.eta is not None else self.eta_per_100ms * self.dt / 100.0

    @property
    def effective_eta_min(self) -> Optional[float]:
        """The floor of a learnable η per step (None: no floor)."""
        return None if self.eta_min_per_100ms is None else self.eta_min_per_100ms * self.dt / 100.0

    @property
    def effective_lambda(self) -> float:
        return self.lambda_decay if self.lambda_decay is not None else math.exp(-self.dt / self.m_timescale_ms)

    @property
    def effective_lambda_max(self) -> float:
        if self.lambda_max is not None:
            return self.lambda_max
        return max(math.exp(-self.dt / self.m_timescale_max_ms), self.effective_lambda)

    @property
    def effective_plain_step_weight(self) -> float:
        return 1.0 if self.td_step_weighting == "uniform" else min(1.0, self.dt / 100.0)

    @property
    def effective_n_step(self) -> int:
        return self.n_step if self.n_step is not None else max(1, int(round(self.n_step_ms / self.dt)))

    @property
    def effective_gamma(self) -> float:
        return self.gamma if self.gamma is not None else math.exp(-self.dt / self.discount_horizon_ms)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(names)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} is not a JSON object of options (got {type(data).__name__})")
        missing = [k for k in ("env_name", "dt", "core", "hidden_dim", "seed") if k not in data]
        if missing:
            raise ConfigError(f"config {path} lacks {', '.join(missing)}; it was not written by "
                              "train-neurogym (restore it, or start a new experiment)")
        for key, value in ABSENT_KEY_VALUES.items():
            data.setdefault(key, value)
        return cls.from_dict(data)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per field."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            base = _base_type(f)
            kw: dict = dict(dest=f.name, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")
            if base is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
                continue
            kw["type"] = _none_or(base) if _is_optional(f) else base
            if f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = base.__name__.upper()
            parser.add_argument(flag, **kw)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})


def check_experiment_name(name: str) -> None:
    ok = name and len(name) <= 200 and all(c.isalnum() or c in "-_." for c in name) \
        and not name.startswith(".")
    if not ok:
        raise ConfigError(f"--experiment-name {name[:60]!r}{'...' if len(name) > 60 else ''} must be "
                          "at most 200 letters, digits, '-', '_' or '.' (no slashes, not starting with '.')")
