"""Live metrics of a run: TensorBoard event files, Prometheus metrics and a heartbeat file.

Both runtimes call :meth:`Telemetry.log` with every record they append to ``metrics.jsonl``:

* **TensorBoard**: scalars in ``experiments/<name>/tensorboard/`` (``tensorboard --logdir
  experiments``), one point per record, step = env steps.  Tags are grouped by role:
  ``learner/*`` (loss, Q mean/max, TD error, η, λ, weights version, updates/s, trial-steps/s
  trained, idle fraction), ``actors/*`` (accuracy, % of ideal, reward per trial, episode
  reward, fixation breaks, ε, env steps/s, policy lag, actor count), ``replay/*`` (size,
  samples per insert).
* **Prometheus** (distributed runtime, ``prometheus=True``): the same series as
  ``ray.util.metrics`` Gauges named ``mpn_dqn_<key>`` (exported by Ray with a ``ray_``
  prefix on each node's metrics port), tagged ``role`` (driver, learner, actor, replay) and
  ``experiment``; plus Counters ``mpn_dqn_env_steps_total``, ``mpn_dqn_trials_total`` and
  ``mpn_dqn_updates_total``.
* **Heartbeat**: ``experiments/<name>/heartbeat.json`` (pid, host, runtime, status, time of
  the last beat, actor count, episode); ``main.py watch`` and ``main.py scale`` read it to
  tell whether the job is alive.

Telemetry never stops a run: a failing writer is disabled with one warning.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import time
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat.json"
TENSORBOARD_DIR = "tensorboard"
PROMETHEUS_PREFIX = "mpn_dqn_"

# record key -> (TensorBoard tag, role that produces it, description)
SERIES: dict[str, tuple[str, str, str]] = {
    "loss": ("learner/loss", "learner", "TD loss (mean over the report window)"),
    "q_mean": ("learner/q_mean", "learner", "mean Q-value of the trained batches"),
    "q_max": ("learner/q_max", "learner", "max Q-value of the trained batches"),
    "td_abs": ("learner/td_error_abs", "learner", "mean |TD error|"),
    "eta": ("learner/eta", "learner", "MPN plasticity rate eta"),
    "lambda": ("learner/lambda", "learner", "MPN decay lambda"),
    "weights_version": ("learner/weights_version", "learner", "published weights version"),
    "updates_per_s": ("learner/updates_per_s", "learner", "learner updates per second"),
    "trial_steps_trained_per_s": ("learner/trial_steps_trained_per_s", "learner",
                                  "trial steps trained per second"),
    "learner_idle_frac": ("learner/idle_frac", "learner", "fraction of time the learner waited"),
    "accuracy": ("actors/accuracy", "actor", "fraction of trials answered correctly"),
    "pct_ideal": ("actors/pct_of_ideal", "actor", "accuracy as % of the ideal observer"),
    "pct_ceiling": ("actors/pct_of_ceiling", "actor",
                    "accuracy as % of the ceiling (ideal observer, else oracle)"),
    "reward_per_trial": ("actors/reward_per_trial", "actor", "mean reward per trial"),
    "reward": ("actors/episode_reward", "actor", "mean reward per episode"),
    "fix_break_rate": ("actors/fix_break_rate", "actor", "fraction of trials with a fixation break"),
    "premature_rate": ("actors/premature_rate", "actor",
                       "fraction of trials with an answer before the response window"),
    "epsilon": ("actors/epsilon", "actor", "exploration epsilon (schedule)"),
    "env_steps_per_s": ("actors/env_steps_per_s", "actor", "environment steps per second"),
    "policy_lag": ("actors/policy_lag", "actor", "weights versions between acting and training"),
    "num_actors": ("actors/num_actors", "driver", "number of actors"),
    "replay_size": ("replay/size", "replay", "trials in the replay buffer"),
    "samples_per_insert": ("replay/samples_per_insert", "replay", "trials sampled per trial inserted"),
}
# cumulative record key -> (Prometheus counter name, role)
COUNTERS: dict[str, tuple[str, str]] = {
    "env_steps": ("env_steps_total", "actor"),
    "trials": ("trials_total", "actor"),
    "updates": ("updates_total", "learner"),
}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None if the file is missing, unreadable, damaged or holds
    something other than an object."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_heartbeat(exp_dir: str | os.PathLike) -> dict | None:
    return read_json(Path(exp_dir) / HEARTBEAT_FILE)


def heartbeat_alive(hb: dict | None, stale_s: float = 30.0, now: float | None = None) -> tuple[bool, str]:
    """``(alive, why)`` for a heartbeat record: alive = status running and a recent beat."""
    if hb is None:
        return False, "no heartbeat (the run has not started, or predates heartbeats)"
    age = (now or time.time()) - float(hb.get("time", 0))
    status = hb.get("status", "?")
    if status != "running":
        return False, f"{status} {age:.0f}s ago"
    if age > stale_s:
        return False, f"no heartbeat for {age:.0f}s (driver stopped or hung)"
    return True, f"running (heartbeat {age:.1f}s ago, pid {hb.get('pid')} on {hb.get('host')})"


class Telemetry:
    def __init__(self, exp_dir: str | os.PathLike, *, runtime: str, experiment: str | None = None,
                 prometheus: bool = False, tensorboard: bool = True):
        self.dir = Path(exp_dir)
        self.runtime = runtime
        self.experiment = experiment or self.dir.name
        self.writer = None
        self.gauges: dict = {}
        self.counters: dict = {}
        self._last_counts: dict[str, float] = {}
        self._hb: dict = {"pid": os.getpid(), "host": socket.gethostname(), "runtime": runtime,
                          "started": time.time()}
        self.closed = False
        # a driver that dies of an exception leaves "exited" rather than a stale "running"
        ref = weakref.ref(self)
        atexit.register(lambda: (t := ref()) is not None and not t.closed and t.heartbeat("exited"))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(self.dir / TENSORBOARD_DIR), flush_secs=10)
            except Exception as exc:  # noqa: BLE001 - telemetry must not stop a run
                log.warning("TensorBoard logging disabled: %s", exc)
        if prometheus:
            self._make_prometheus()

    # -- Prometheus ------------------------------------------------------------------------
    def _make_prometheus(self) -> None:
        try:
            from ray.util.metrics import Counter, Gauge
            tags = ("role", "experiment")
            for key, (_tag, _role, desc) in SERIES.items():
                self.gauges[key] = Gauge(PROMETHEUS_PREFIX + key, description=desc, tag_keys=tags)
            for key, (name, _role) in COUNTERS.items():
                self.counters[key] = Counter(PROMETHEUS_PREFIX + name,
                                             description=f"cumulative {key.replace('_', ' ')}",
                                             tag_keys=tags)
        except Exception as exc:  # noqa: BLE001
            log.warning("Prometheus metrics disabled: %s", exc)
            self.gauges, self.counters = {}, {}

    def prometheus_names(self) -> list[str]:
        return sorted(m.info["name"] for m in [*self.gauges.values(), *self.counters.values()])

    # -- records ---------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        step = int(record.get("env_steps") or 0)
        for key, (tag, role, _desc) in SERIES.items():
            v = _number(record.get(key))
            if v is None:
                continue
            if self.writer is not None:
                self._safe(self.writer.add_scalar, tag, v, step)
            if key in self.gauges:
                self._safe(self.gauges[key].set, v, {"role": role, "experiment": self.experiment})
        for key, (_name, role) in COUNTERS.items():
            v = _number(record.get(key))
            if v is None or key not in self.counters:
                continue
            delta = v - self._last_counts.get(key, 0.0)
            self._last_counts[key] = v
            if delta > 0:
                self._safe(self.counters[key].inc, delta, {"role": role, "experiment": self.experiment})
        if self.writer is not None:
            self._safe(self.writer.flush)
        self.heartbeat("running", episode=record.get("episode"), num_actors=record.get("num_actors"))

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            log.warning("telemetry: %s failed (%s); disabling that output", getattr(fn, "__name__", fn), exc)
            if getattr(fn, "__self__", None) is self.writer:
                self.writer = None

    # -- heartbeat -------------------------------------------------------------------------
    def heartbeat(self, status: str = "running", **info) -> None:
        self._hb.update({k: v for k, v in info.items() if v is not None})
        self._hb.update(status=status, time=time.time())
        try:
            write_json_atomic(self.dir / HEARTBEAT_FILE, self._hb)
        except OSError as exc:
            log.warning("heartbeat not written: %s", exc)

    def close(self, status: str = "finished") -> None:
        self.closed = True
        self.heartbeat(status)
        if self.writer is not None:
            self._safe(self.writer.close)
            self.writer = None
