"""Counters, report windows, progress lines and the progress bar (shared by both runtimes)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from mpn_dqn.common.ceiling import ceiling_for, pct_of_ceiling
from mpn_dqn.common.tasks import pct_of_ideal


def episodes_left(episodes: int, target: int | None) -> bool:
    """True while a run with episode target ``target`` (None: none, the time limit ends it)
    has episodes to go."""
    return target is None or episodes < target


def explain_overshoot(episodes: int, target: int | None, envs: int, log) -> None:
    """Say why a run ends a few episodes past the count asked for."""
    if target is not None and episodes > target:
        log(f"Stopped at episode {episodes} of {target}: the {envs} envs of an actor finish their "
            "episodes together, so the last step can complete a few more than asked")


class Cadence:
    """When a metrics record, a progress line and a checkpoint are due, in both runtimes.

    A record is written every ``--print-freq`` episodes (with a progress line, and the check for
    a new ``best_model.pt``) and, between those, every 1 % of the run's episodes and at least
    every ``--record-seconds`` of training (a record only: its window may hold few trials), so
    that every run has a curve of about 100 points or more.
    A checkpoint is due every ``--checkpoint-freq`` episodes or ``--checkpoint-minutes`` of
    training, whichever comes first, so a killed short run can still be resumed."""

    def __init__(self, cfg, episodes: int, now: float, target: int | None, trials: int = 0):
        self.cfg = cfg
        self.next_line = (episodes // cfg.print_freq + 1) * cfg.print_freq
        # 1 % of the run, counted in trials (they arrive more often than whole episodes)
        self.tpe = getattr(cfg, "trials_per_episode", 1)
        # (no episode target: records by time only, every --record-seconds)
        self.step = max(1, target * self.tpe // 100) if target is not None else 2 ** 62
        self.next_record = (trials // self.step + 1) * self.step
        self.next_ckpt = (episodes // cfg.checkpoint_freq + 1) * cfg.checkpoint_freq
        self.t_record = self.t_ckpt = now
        self.ep_record = episodes
        self.trials_record = trials              # a resumed run records only what is new

    def record_due(self, episodes: int, now: float, target: int | None,
                   trials: int | None = None) -> str | None:
        """"line" (a record with a progress line), "record" (a record only) or None.  A
        record by time needs new trials since the last one (``trials``; else new episodes)."""
        if episodes >= self.next_line or not episodes_left(episodes, target):
            return "line"
        fresh = (trials > self.trials_record) if trials is not None else (episodes > self.ep_record)
        done = trials if trials is not None else episodes * self.tpe
        if done >= self.next_record or (self.cfg.record_seconds > 0 and fresh
                                            and now - self.t_record >= self.cfg.record_seconds):
            return "record"
        return None

    def recorded(self, kind: str, episodes: int, now: float, trials: int | None = None) -> None:
        self.t_record, self.ep_record = now, episodes
        if trials is not None:
            self.trials_record = trials
        done = trials if trials is not None else episodes * self.tpe
        self.next_record = (done // self.step + 1) * self.step
        if kind == "line":
            self.next_line = (episodes // self.cfg.print_freq + 1) * self.cfg.print_freq

    def checkpoint_due(self, episodes: int, now: float) -> bool:
        return episodes >= self.next_ckpt or (self.cfg.checkpoint_minutes > 0 and
                                              now - self.t_ckpt >= 60 * self.cfg.checkpoint_minutes)

    def checkpointed(self, episodes: int, now: float) -> None:
        self.t_ckpt = now
        self.next_ckpt = (episodes // self.cfg.checkpoint_freq + 1) * self.cfg.checkpoint_freq


@dataclass
class Counters:
    """Everything a resumed run must continue from (saved in checkpoints)."""

    episodes: int = 0
    env_steps: int = 0
    trials: int = 0
    updates: int = 0
    trial_steps_trained: int = 0
    best_accuracy: float = -1.0
    wall_time: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Counters":
        c = cls()
        for k, v in d.items():
            if hasattr(c, k):
                setattr(c, k, type(getattr(c, k))(v))
        return c


@dataclass
class ReportWindow:
    """Aggregates trials, episodes and learner stats between two reports."""

    correct: int = 0
    trials: int = 0
    trial_steps: int = 0
    fix_break_trials: int = 0
    premature_trials: int = 0
    ep_rewards: list = field(default_factory=list)
    ep_lengths: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    q_means: list = field(default_factory=list)
    td_abs: list = field(default_factory=list)
    lags: list = field(default_factory=list)
    q_maxs: list = field(default_factory=list)
    trial_reward: float = 0.0
    staleness: list = field(default_factory=list)

    def add_trial_summaries(self, rows, current_version: int | None = None) -> None:
        """Rows ``[correct, length, fix_break, weights_version, reward, premature]`` (actor
        summaries)."""
        for correct, length, brk, version, reward, premature in rows:
            self.premature_trials += int(premature)
            self.correct += int(correct)
            self.trials += 1
            self.trial_steps += int(length)
            self.fix_break_trials += int(brk)
            self.trial_reward += float(reward)
            if current_version is not None:
                self.lags.append(current_version - int(version))

    def add_episodes(self, episodes) -> None:
        for e in episodes:
            self.ep_rewards.append(e.reward)
            self.ep_lengths.append(e.steps)

    def add_learner_stats(self, stats: dict) -> None:
        if "loss" in stats:
            self.losses.append(float(stats["loss"]))
        if "q_mean" in stats:
            self.q_means.append(float(stats["q_mean"]))
        if "td_abs" in stats:
            self.td_abs.append(float(stats["td_abs"]))
        if "q_max" in stats:
            self.q_maxs.append(float(stats["q_max"]))


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else None


def make_record(win: ReportWindow, c: Counters, *, env_name: str, dt: int, epsilon: float,
                weights_version: int, elapsed: float, rate_env: float, rate_upd: float,
                rate_train: float, replay_size: int, num_actors: int, extra: dict | None = None) -> dict:
    acc = win.correct / win.trials if win.trials else None
    ceil = ceiling_for(env_name, dt)
    rec = {
        "episode": c.episodes, "env_steps": c.env_steps, "trials": c.trials,
        "reward": _mean(win.ep_rewards), "episode_len": _mean(win.ep_lengths),
        "accuracy": acc, "pct_ideal": pct_of_ideal(acc, env_name, dt),
        "pct_ceiling": pct_of_ceiling(acc, ceil),
        "best_trivial_accuracy": ceil["best_trivial"]["accuracy"],
        "fix_break_rate": (win.fix_break_trials / win.trials) if win.trials else None,
        "premature_rate": (win.premature_trials / win.trials) if win.trials else None,
        "loss": _mean(win.losses), "q_mean": _mean(win.q_means), "td_abs": _mean(win.td_abs),
        "q_max": max(win.q_maxs) if win.q_maxs else None,
        "reward_per_trial": (win.trial_reward / win.trials) if win.trials else None,
        "epsilon": epsilon, "updates": c.updates, "weights_version": weights_version,
        "policy_lag": _mean(win.lags), "env_steps_per_s": rate_env, "updates_per_s": rate_upd,
        "trial_steps_trained_per_s": rate_train, "replay_size": replay_size,
        "num_actors": num_actors, "wall_time": elapsed,
    }
    if win.staleness:
        rec["staleness_q_gap"] = _mean([s["staleness_q_gap"] for s in win.staleness])
        rec["staleness_rel"] = _mean([s["staleness_rel"] for s in win.staleness])
    if extra:
        rec.update(extra)
    return rec


def _fmt(v, spec: str, none: str = "   -") -> str:
    return none if v is None else format(v, spec)


def progress_line(rec: dict, num_episodes: int | None) -> str:
    """The seed's line, extended: ``Ep 100/1000 | Reward | Len | Loss | ε | Trials | Acc ...``
    (``Ep 100 |`` with no episode target)."""
    pct = rec.get("pct_ceiling")
    ep = (f"{rec['episode']:>{len(str(num_episodes))}}/{num_episodes}" if num_episodes is not None
          else f"{rec['episode']:>6}")
    return (f"Ep {ep} | Reward: {_fmt(rec['reward'], '7.2f')} | "
            f"Len: {_fmt(rec['episode_len'], '5.0f')} | Loss: {_fmt(rec['loss'], '.4f', '     -')} | "
            f"ε: {rec['epsilon']:.3f} | Trials: {rec['trials']:>6} | "
            f"Acc: {_fmt(rec['accuracy'], '.3f', '    -')} ({_fmt(pct, '5.1f', '  -')}% ceil, trivial "
            f"{_fmt(rec.get('best_trivial_accuracy'), '.2f', '-')}) | "
            f"FixBrk: {_fmt(rec['fix_break_rate'], '.2f', '  -')} | "
            f"Early: {_fmt(rec.get('premature_rate'), '.2f', '  -')} | "
            f"{rec['env_steps_per_s']:7.0f} env st/s | {rec['updates_per_s']:5.1f} upd/s | "
            f"lag: {_fmt(rec['policy_lag'], '.1f', '-')}")


class ProgressBar:
    """A one-line bar with ETA on stderr (only when stderr is a terminal, or when forced)."""

    def __init__(self, total: int | None, start: int = 0, stream=None, enabled: bool | None = None,
                 deadline: float | None = None):
        self.total = total
        self.deadline = deadline                 # --time-limit-minutes: the ETA never exceeds it
        self.start_value = start
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.time()
        self.last = 0.0

    def update(self, value: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        if self.total is not None:
            frac = min(1.0, value / max(1, self.total))
            done = value - self.start_value
            rate = done / max(1e-9, now - self.t0)
            eta = (self.total - value) / rate if rate > 0 else float("inf")
        else:                                    # time-bounded run: the bar is the time used
            frac = eta = float("inf")
        if self.deadline is not None:
            eta = min(eta, max(0.0, self.deadline - now))
            if self.total is None:
                frac = min(1.0, (now - self.t0) / max(1e-9, self.deadline - self.t0))
        frac = 0.0 if frac == float("inf") else frac
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_s = "--:--" if eta == float("inf") else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        count = f"{value}/{self.total}" if self.total is not None else f"{value}"
        self.stream.write(f"\r[{bar}] {count} episodes  ETA {eta_s} ")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()
