"""The driver dies: ``train-neurogym --num-actors 1`` is SIGKILLed mid-run (after its first
checkpoint and replay snapshot exist), and ``resume`` continues from them — model, optimizer,
target net, counters (the epsilon schedule runs on env_steps), replay contents and the replay
sampling RNG.  Both runs are real subprocesses with their own embedded Ray; while the first
runs, every socket its Ray listens on must be bound to 127.0.0.1.  SIGTERM and SIGINT stop a
run with a final checkpoint and exit 128 + the signal's number.  Each run starts its own
session; once it has exited, nothing of it may be left running in that session (after a
SIGKILL, only two agents of Ray's own).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpn_dqn.driver.experiment import Experiment, load_checkpoint
from mpn_dqn.common.exploration import epsilon_at
from mpn_dqn.driver.runtime.recovery import snapshot_info, snapshot_path
from mpn_dqn.replay.snapshot import read_snapshot_file

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_AGENTS = frozenset({"ray::DashboardA", "ray::RuntimeEnv"})     # process names (cut to 15 characters)


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return env


def _tree(root: int) -> set[int]:
    """``root`` and its descendants (by parent pid)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parents[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(c for c, pp in parents.items() if pp == p and c not in out)
    return out


def _session(sid: int) -> dict[int, str]:
    """Live processes (not zombies) of session ``sid``: pid -> command name."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    head, tail = fh.read().rsplit(")", 1)
            except OSError:
                continue
            fields = tail.split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                out[int(d)] = head.split("(", 1)[1]
    return out


def _session_left(sid: int, allowed: frozenset = frozenset(), wait_s: float = 15.0) -> dict[int, str]:
    """What is alive in session ``sid`` once only ``allowed`` names are left, or after ``wait_s``
    seconds."""
    deadline = time.time() + wait_s
    left = _session(sid)
    while set(left.values()) - allowed and time.time() < deadline:
        time.sleep(0.5)
        left = _session(sid)
    return left


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    addrs = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            addrs.append(line.split()[3])
    return addrs


def test_driver_sigkilled_then_resume_continues_from_checkpoint_and_snapshot(tmp_path):
    name = "killed"
    train = [sys.executable, "main.py", "train-neurogym", "--env-name", "PerceptualDecisionMaking-v0",
             "--num-actors", "1", "--envs-per-actor", "4", "--num-episodes", "100000",
             "--hidden-dim", "16", "--trial-batch-size", "8", "--learning-starts", "16",
             "--buffer-size", "300", "--print-freq", "4", "--checkpoint-freq", "8",
             "--trials-per-episode", "4",
             "--replay-snapshot-every", "1000", "--eval-trials", "20",
             "--experiments-dir", str(tmp_path), "--experiment-name", name]
    exp = Experiment(tmp_path, name)
    log = open(tmp_path / "train.log", "w")
    p = subprocess.Popen(train, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                         start_new_session=True)
    sockets, left = [], {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if list(exp.checkpoint_dir.glob("checkpoint_*.pt")) and snapshot_path(exp).exists():
                break
            time.sleep(0.2)
        assert p.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        assert snapshot_path(exp).exists(), "no checkpoint + snapshot within 120 s"
        sockets = _listening(_tree(p.pid))
        # one driver per experiment: while this one lives, a second driver is refused
        second = subprocess.run([sys.executable, "main.py", "resume", "--experiments-dir", str(tmp_path),
                                 "--experiment-name", name], cwd=ROOT, capture_output=True, text=True,
                                env=_env(), timeout=120)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-2000:]
        p.send_signal(signal.SIGKILL)                    # the fault: the driver dies
        p.wait(timeout=30)
        left = _session_left(p.pid, RAY_AGENTS)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        time.sleep(1.0)
        try:
            os.killpg(p.pid, signal.SIGKILL)             # leftovers of its embedded Ray
        except ProcessLookupError:
            pass
        log.close()
    assert p.returncode == -signal.SIGKILL
    # Nothing of the run outlives it (driver, actors, learner, replay, raylet, GCS) but two agents
    # of Ray's own, which a SIGKILLed driver cannot stop: its dashboard and runtime-env agents.
    assert set(left.values()) <= RAY_AGENTS, f"still running in the killed driver's session: {left}"

    # the embedded Ray listened on loopback only
    assert sockets, "found no listening sockets of the embedded Ray"
    exposed = [a for a in sockets if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))]
    assert not exposed, f"embedded Ray listens beyond 127.0.0.1: {exposed}"

    # what the killed run left: its newest checkpoint and replay snapshot, both whole
    latest = exp.latest_checkpoint()
    ck = load_checkpoint(latest)
    _, arrays = read_snapshot_file(snapshot_path(exp))
    snap = snapshot_info(arrays)
    assert snap["size"] > 0 and ck["counters"]["updates"] > 0
    before = exp.read_metrics()
    target = ck["counters"]["episodes"] + 8

    resume = [sys.executable, "main.py", "resume", "--experiments-dir", str(tmp_path),
              "--experiment-name", name, "--num-episodes", str(target)]
    r = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=150, env=_env(),
                       start_new_session=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"Replay restored from {snapshot_path(exp).name}: {snap['size']} trials" in r.stdout
    # a run that starts its own embedded Ray and ends normally, with the greedy evaluation
    assert "Starting an embedded Ray on 127.0.0.1" in r.stdout and "Greedy evaluation" in r.stdout, \
        r.stdout[-2000:]

    # resume.json: the counters are the checkpoint's, the replay is the snapshot's
    res = json.loads((exp.dir / "resume.json").read_text())
    assert res["checkpoint"] == str(latest)
    assert res["counters"] == ck["counters"]
    assert res["replay"]["size"] == snap["size"]
    assert res["replay"]["inserted"] == snap["inserted"]
    assert res["replay"]["sampled"] == snap["samples"]
    assert res["snapshot"]["extra"] == snap["extra"]

    # training went on from there: counters continue, the epsilon schedule follows env_steps
    new = exp.read_metrics()[len(before):]
    assert new and new[-1]["episode"] >= target and new[-1]["num_actors"] == 1
    c0 = ck["counters"]
    for rec in new:
        assert rec["episode"] >= c0["episodes"] and rec["env_steps"] > c0["env_steps"]
        assert rec["trials"] > c0["trials"] and rec["updates"] >= c0["updates"]
        cfg = json.loads((exp.dir / "config.json").read_text())
        eps = epsilon_at(rec["env_steps"], cfg["epsilon_start"], cfg["epsilon_end"],
                         cfg["epsilon_decay_steps"], cfg["dt"])
        assert rec["epsilon"] == pytest.approx(eps, abs=0.02)
    final = load_checkpoint(exp.checkpoint_dir / "final_model.pt")
    assert final["learner"]["updates"] > ck["learner"]["updates"]
    # the optimizer continued (Adam's step count grew from the checkpoint's)
    step0 = [float(s["step"]) for s in ck["learner"]["optimizer"]["state"].values()]
    step1 = [float(s["step"]) for s in final["learner"]["optimizer"]["state"].values()]
    assert min(step1) > max(step0) > 0
    np.testing.assert_equal(final["spec"], ck["spec"])


@pytest.mark.parametrize("sig,actors", [("SIGTERM", "0"), ("SIGTERM", "1"), ("SIGINT", "0")])
def test_a_signal_saves_a_final_checkpoint_and_exits_128_plus_its_number(tmp_path, sig, actors):
    """SIGTERM (what systemd, Kubernetes, Slurm and `timeout` send) and Ctrl-C's SIGINT: the run
    stops (final checkpoint, replay snapshot, heartbeat "interrupted"), exits 128 + the signal's
    number (143, 130), and leaves no process behind in its session (its embedded Ray included)."""
    signum = signal.Signals[sig]
    exp = Experiment(tmp_path, "term")
    cmd = [sys.executable, "main.py", "train-neurogym", "--env-name", "PerceptualDecisionMaking-v0",
           "--num-actors", actors, "--envs-per-actor", "4", "--num-episodes", "100000", "--hidden-dim", "16",
           "--trial-batch-size", "8", "--learning-starts", "16", "--print-freq", "4", "--trials-per-episode", "4",
           "--eval-trials", "0", "--experiments-dir", str(tmp_path), "--experiment-name", "term"]
    log = open(tmp_path / "train.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    left = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not exp.read_metrics():
            time.sleep(0.2)
        assert p.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        p.send_signal(signum)
        rc = p.wait(timeout=90)
        left = _session_left(p.pid)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        try:
            os.killpg(p.pid, signal.SIGKILL)             # leftovers, if the assertion below fails
        except ProcessLookupError:
            pass
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert rc == 128 + signum, out[-3000:]
    assert f"{sig}: finishing the current step" in out
    assert not left, f"still running in the run's session after it exited: {left}"
    assert exp.latest_checkpoint().name == "final_model.pt"
    summary = json.loads((exp.dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["signal"] == sig
    assert json.loads((exp.dir / "heartbeat.json").read_text())["status"] == "interrupted"
    assert snapshot_path(exp).exists()
