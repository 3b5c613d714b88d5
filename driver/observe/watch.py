"""``python main.py watch``: a live terminal view of a run, refreshed from metrics.jsonl.

It reads only files of the experiment directory (``metrics.jsonl``, ``heartbeat.json``,
``config.json``, ``control_result.json``), so it works for both runtimes, from any shell
that sees that directory, without connecting to Ray.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mpn_dqn.driver.observe.telemetry import heartbeat_alive, read_heartbeat, read_json

SPARK = "▁▂▃▄▅▆▇█"
TREND_LEN = 40
# (label, record key, format)
ROWS = [
    ("accuracy", "accuracy", ".3f"),
    ("% of ceiling", "pct_ceiling", ".1f"),
    ("best trivial policy", "best_trivial_accuracy", ".3f"),
    ("reward / trial", "reward_per_trial", ".3f"),
    ("episode reward", "reward", ".2f"),
    ("fixation breaks", "fix_break_rate", ".2f"),
    ("premature responses", "premature_rate", ".2f"),
    ("loss", "loss", ".4f"),
    ("Q mean", "q_mean", ".3f"),
    ("Q max", "q_max", ".3f"),
    ("|TD error|", "td_abs", ".4f"),
    ("epsilon", "epsilon", ".3f"),
    ("env steps/s", "env_steps_per_s", ",.0f"),
    ("trial-steps/s trained", "trial_steps_trained_per_s", ",.0f"),
    ("updates/s", "updates_per_s", ".1f"),
    ("replay size", "replay_size", ",.0f"),
    ("samples / insert", "samples_per_insert", ".2f"),
    ("policy lag", "policy_lag", ".1f"),
    ("weights version", "weights_version", ",.0f"),
    ("actors", "num_actors", ".0f"),
    ("eta", "eta", ".4f"),
    ("lambda", "lambda", ".4f"),
]


def tail_records(path: Path, n: int = TREND_LEN, chunk: int = 1 << 16) -> list[dict]:
    """The last ``n`` parseable records of a JSON-lines file (reads from the end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            pos, data = end, b""
            while pos > 0 and data.count(b"\n") <= n:
                step = min(chunk, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except OSError:
        return []
    out = []
    for line in data.splitlines()[-(n + 1):]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue          # a partial first line, or a line cut by a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out[-n:]


def sparkline(values: list, width: int = TREND_LEN) -> str:
    vals = values[-width:]
    nums = [v for v in vals if isinstance(v, (int, float))]
    if not nums:
        return ""
    lo, hi = min(nums), max(nums)
    out = []
    for v in vals:
        if not isinstance(v, (int, float)):
            out.append(" ")
        elif hi == lo:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))])
    return "".join(out)


def _fmt(v, spec: str) -> str:
    if v is None or not isinstance(v, (int, float)):
        return "-"
    return format(v, spec)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def render(exp_dir: str | os.PathLike, now: float | None = None, stale_s: float = 30.0) -> str:
    """One screen of text for the experiment directory."""
    d = Path(exp_dir)
    now = now or time.time()
    cfg = read_json(d / "config.json") or {}
    recs = tail_records(d / "metrics.jsonl")
    hb = read_heartbeat(d)
    alive, why = heartbeat_alive(hb, stale_s=stale_s, now=now)
    last = recs[-1] if recs else {}
    lines = [f"mpn-dqn watch: {d.name}  ({cfg.get('env_name', '?')}, dt {cfg.get('dt', '?')}, "
             f"core {cfg.get('core', '?')})   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"]
    state = "ALIVE" if alive else "NOT RUNNING"
    runtime = (hb or {}).get("runtime", "?")
    lines.append(f"Job: {state}: {why}; runtime {runtime}")
    target = (hb or {}).get("target_episodes") or cfg.get("num_episodes")
    episode = (hb or {}).get("episode", last.get("episode"))
    if episode is None:
        episode = last.get("episode", 0)
    pct = f" ({100 * episode / target:.1f}%)" if target else ""
    limit = cfg.get("time_limit_minutes")
    if not target and limit and last.get("wall_time") is not None:     # a time-bounded run
        pct = f" ({100 * last['wall_time'] / (60 * limit):.1f}% of {limit:g} min)"
    nodes = last.get("num_nodes")
    actors = (hb or {}).get("num_actors", last.get("num_actors"))
    lines.append(f"Progress: episode {episode}{'/' + str(target) if target else ''}{pct} | actors {_fmt(actors, '.0f')}"
                 + (f" on {nodes} node(s)" if nodes else "")
                 + f" | env steps {_fmt(last.get('env_steps'), ',.0f')} | trials "
                 f"{_fmt(last.get('trials'), ',.0f')} | updates {_fmt(last.get('updates'), ',.0f')}")
    mtime = None
    try:
        mtime = (d / "metrics.jsonl").stat().st_mtime
    except OSError:
        pass
    if not recs:
        lines.append("No metrics records yet.")
    else:
        lines.append(f"Last record: episode {last.get('episode')}, written {_ago(now - mtime)} ago"
                     if mtime else "")
        lines.append("")
        lines.append(f"{'metric':<22} {'latest':>10}  {'trend (last ' + str(len(recs)) + ' records)':<{TREND_LEN}}"
                     f" {'min':>10} {'max':>10}")
        for label, key, spec in ROWS:
            series = [r.get(key) for r in recs]
            nums = [v for v in series if isinstance(v, (int, float))]
            if not nums:
                continue
            lines.append(f"{label:<22} {_fmt(series[-1], spec):>10}  {sparkline(series):<{TREND_LEN}}"
                         f" {_fmt(min(nums), spec):>10} {_fmt(max(nums), spec):>10}")
    try:
        res = json.loads((d / "control_result.json").read_text())
        lines.append("")
        lines.append(f"Last scale request {res.get('request_id')}: {res.get('status')} "
                     f"{res.get('num_actors_before')} -> {res.get('num_actors')} actors at episode "
                     f"{res.get('episode')} ({_ago(now - float(res.get('time', now)))} ago)"
                     + (f": {res['reason']}" if res.get("reason") else ""))
    except (OSError, ValueError):
        pass
    return "\n".join(lines)


def watch(exp_dir: str | os.PathLike, *, once: bool = False, interval: float = 2.0,
          stream=None) -> int:
    stream = stream or sys.stdout
    clear = "\x1b[H\x1b[2J" if stream.isatty() else ""
    try:
        while True:
            screen = render(exp_dir)
            stream.write(clear + screen + "\n")
            stream.flush()
            if once:
                return 0
            hb = read_heartbeat(exp_dir)
            if hb is not None and hb.get("status") in ("finished", "interrupted"):
                return 0          # the run ended: the screen above is its final state
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
