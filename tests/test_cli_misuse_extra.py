"""More CLI misuse (beyond tests/test_cli.py's table) and damaged files under ``resume``:
each exits 2 with one line on stderr naming the problem, and writes nothing.  Also: the
single-process runtime snapshots its replay buffer and ``resume`` restores it."""
import json
import warnings
import os
import time
from pathlib import Path

import pytest
import torch

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.cli.parser import main
from mpn_dqn.replay.snapshot import read_snapshot_file
from tests.helpers import copy_experiment

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

PDM = "PerceptualDecisionMaking-v0"
GUARD = ["--num-actors", "0", "--num-episodes", "1", "--eval-trials", "0", "--envs-per-actor", "1",
         "--hidden-dim", "4", "--experiment-name", "guard"]


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _one_line(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


MISUSE_EXTRA = [
    ("float-wrong-type", ["train-neurogym", *GUARD, "--lr", "fast"], ["--lr", "fast"]),
    ("float-not-finite", ["train-neurogym", *GUARD, "--lr", "nan"], ["--lr"]),
    ("lr-zero", ["train-neurogym", *GUARD, "--lr", "0"], ["--lr", "> 0"]),
    ("gamma-above-1", ["train-neurogym", *GUARD, "--gamma", "1.5"], ["--gamma", "<= 1"]),
    ("dt-zero", ["train-neurogym", *GUARD, "--dt", "0"], ["--dt", ">= 1"]),
    ("negative-actors", ["train-neurogym", *GUARD, "--num-actors", "-2"], ["--num-actors"]),
    ("negative-snapshot-period", ["train-neurogym", *GUARD, "--replay-snapshot-every", "-1"],
     ["--replay-snapshot-every", ">= 0"]),
    ("snapshot-period-wrong-type", ["train-neurogym", *GUARD, "--replay-snapshot-every", "1e3"],
     ["--replay-snapshot-every"]),
    ("bool-flag-with-value", ["train-neurogym", *GUARD, "--dueling=yes"], ["--dueling"]),
    ("misspelt-snapshot-option", ["train-neurogym", *GUARD, "--replay-snapshot-evry", "5"],
     ["did you mean --replay-snapshot-every"]),
    ("eval-no-name", ["eval"], ["--experiment-name"]),
    ("eval-episodes-wrong-type", ["eval", "--experiment-name", "taken", "--num-eval-episodes", "x"],
     ["--num-eval-episodes"]),
    ("resume-zero-episodes", ["resume", "--experiment-name", "taken", "--num-episodes", "0"],
     ["--num-episodes"]),
    ("resume-misspelt", ["resume", "--experiment-name", "taken", "--num-episode", "9"],
     ["did you mean --num-episodes"]),
    ("resume-no-checkpoint", ["resume", "--experiment-name", "taken"], ["no checkpoint"]),
    ("resume-path-name", ["resume", "--experiment-name", "../taken"], ["--experiment-name"]),
]


@pytest.mark.parametrize("case_id,argv,expected", MISUSE_EXTRA, ids=[c[0] for c in MISUSE_EXTRA])
def test_more_misuse_exits_2_with_one_line_and_writes_nothing(case_id, argv, expected, tmp_path,
                                                              capsys):
    exps = tmp_path / "exps"
    (exps / "taken" / "checkpoints").mkdir(parents=True)
    TrainConfig(experiment_name="taken").save(str(exps / "taken" / "config.json"))
    before = _files(tmp_path)
    rc = main([*argv, "--experiments-dir", str(exps)])
    assert rc == 2
    msg = _one_line(capsys.readouterr().err)
    for s in expected:
        assert s in msg, f"{s!r} not in {msg!r}"
    assert _files(tmp_path) == before


# --- damaged files under resume, and the single-process replay snapshot --------------------------

TRAIN = ["train-neurogym", "--num-actors", "0", "--env-name", PDM, "--num-episodes", "12",
         "--envs-per-actor", "4", "--trials-per-episode", "4", "--learning-starts", "16",
         "--trial-batch-size", "8", "--eval-trials", "0", "--print-freq", "4",
         "--checkpoint-freq", "4", "--hidden-dim", "16", "--replay-snapshot-every", "20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local")
    assert main([*TRAIN, "--experiments-dir", str(root), "--experiment-name", "tiny"]) == 0
    return root / "tiny"


def _resume(exp: Path, episodes: int):
    return main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
                 "--num-episodes", str(episodes)])


def test_local_run_snapshots_its_replay_and_resume_restores_it(trained, tmp_path, capsys):
    exp = copy_experiment(trained, tmp_path)
    _, arrays = read_snapshot_file(exp / "checkpoints" / "replay_snapshot.npz")
    size, inserted = int(arrays["buf_size"]), int(arrays["limiter_inserts"])
    ck = torch.load(exp / "checkpoints" / "final_model.pt", weights_only=True)
    assert size > 0 and int(arrays["extra_episodes"]) == ck["counters"]["episodes"]
    assert _resume(exp, ck["counters"]["episodes"] + 4) == 0
    out = capsys.readouterr().out
    assert f"Replay restored from replay_snapshot.npz: {size} trials" in out
    res = json.loads((exp / "resume.json").read_text())
    assert res["replay"]["size"] == size and res["replay"]["inserted"] == inserted
    assert res["counters"] == ck["counters"]


@pytest.mark.parametrize("damage", ["truncate-checkpoint", "alter-checkpoint", "truncate-snapshot",
                                    "garbage-snapshot"])
def test_resume_with_a_damaged_file_exits_2_naming_it_and_writes_nothing(trained, tmp_path, capsys,
                                                                         damage):
    exp = copy_experiment(trained, tmp_path)
    # as a killed run leaves it: periodic checkpoints, no final model
    (exp / "checkpoints" / "final_model.pt").unlink()
    ck_path = max((exp / "checkpoints").glob("checkpoint_*.pt"), key=lambda p: int(p.stem[11:]))
    snap = exp / "checkpoints" / "replay_snapshot.npz"
    # a damaged newest checkpoint alone is skipped (test_cli.py); here every one is damaged
    if damage == "truncate-checkpoint":
        bad = ck_path
        for p in (exp / "checkpoints").glob("checkpoint_*.pt"):
            p.write_bytes(p.read_bytes()[:5000])
    elif damage == "alter-checkpoint":
        bad = ck_path
        for p in (exp / "checkpoints").glob("checkpoint_*.pt"):
            ck = torch.load(p, weights_only=True)
            first = next(iter(ck["learner"]["online"]))
            ck["learner"]["online"][first].view(-1)[0] += 1.0
            torch.save(ck, p)
    elif damage == "truncate-snapshot":
        bad = snap
        bad.write_bytes(snap.read_bytes()[:-100])
    else:
        bad = snap
        bad.write_bytes(b"PK\x03\x04" + b"\0" * 300)
    before = _files(tmp_path)
    rc = _resume(exp, 40)
    assert rc == 2
    msg = _one_line(capsys.readouterr().err)
    assert (bad.name if bad is ck_path else str(bad)) in msg
    assert _files(tmp_path) == before


def test_a_checkpoint_of_another_experiment_is_refused_in_one_line(trained, tmp_path, capsys):
    """eval, render, analyze and resume check the checkpoint against the experiment's config
    (task, sizes, core) before they use it or rewrite anything."""
    exp = copy_experiment(trained, tmp_path)
    cfg = json.loads((exp / "config.json").read_text())
    (exp / "config.json").write_text(json.dumps(dict(cfg, hidden_dim=cfg["hidden_dim"] * 2)))
    before = _files(tmp_path)
    for argv in (["eval"], ["render", "--output", str(tmp_path / "x.gif")], ["analyze"],
                 ["resume", "--num-episodes", "100000"]):
        assert main([argv[0], "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
                     *argv[1:]]) == 2, argv
        msg = _one_line(capsys.readouterr().err)
        assert "hidden_dim" in msg and "belongs to another experiment" in msg, msg
    assert _files(tmp_path) == before


@pytest.mark.parametrize("text", ["{}", "[]", "null"])
def test_a_config_json_that_is_not_one_is_refused(trained, tmp_path, capsys, text):
    exp = copy_experiment(trained, tmp_path)
    (exp / "config.json").write_text(text)
    before = _files(tmp_path)
    assert _resume(exp, 100000) == 2
    assert "config" in _one_line(capsys.readouterr().err)
    assert _files(tmp_path) == before


def test_unbounded_eval_and_an_unreachable_address_are_refused(tmp_path, capsys):
    assert main(["eval", "--experiments-dir", str(tmp_path), "--experiment-name", "x",
                 "--num-eval-episodes", "1000000000"]) == 2
    assert "more than 10000" in _one_line(capsys.readouterr().err)
    t0 = time.time()
    assert main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "1",
                 "--address", "127.0.0.1:1", "--experiments-dir", str(tmp_path / "e")]) == 2
    assert time.time() - t0 < 30
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "e").exists()


def test_failed_periodic_writes_are_reported_counted_and_training_goes_on(tmp_path, capsys, monkeypatch):
    """A full disk while training (checkpoints and replay snapshots fail with ENOSPC): one
    warning per kind, `io_errors` in the metrics, training reaches its episode count, and once
    writing works again the final checkpoint is written."""
    import errno
    import mpn_dqn.replay.snapshot as snapshot_mod
    import mpn_dqn.driver.experiment as experiment_mod
    real = snapshot_mod.write_atomic
    state = {"full": True}

    def flaky(path, data):
        if state["full"] and ("checkpoint_" in str(path) or "replay_snapshot" in str(path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)
    monkeypatch.setattr(snapshot_mod, "write_atomic", flaky)
    monkeypatch.setattr(experiment_mod, "write_atomic", flaky)
    from mpn_dqn.driver.runtime.local import train_local
    cfg = TrainConfig(env_name="PerceptualDecisionMaking-v0", num_actors=0, num_episodes=40, envs_per_actor=4,
                      learning_starts=16, trial_batch_size=8, hidden_dim=16, print_freq=8, checkpoint_freq=8,
                      replay_snapshot_every=20, eval_trials=0, experiments_dir=str(tmp_path), experiment_name="full")
    from mpn_dqn.driver.experiment import Experiment
    exp = Experiment(tmp_path, "full")
    exp.create(cfg)
    logs = []
    summary = train_local(cfg, exp, log=logs.append)
    assert summary["episodes"] >= 40
    warn = [m for m in logs if m.startswith("Warning: could not write")]
    assert len(warn) == 2 and all("No space left on device" in m for m in warn), warn
    recs = exp.read_metrics()
    assert recs[-1]["io_errors"] >= 4
    assert not list(exp.checkpoint_dir.glob("checkpoint_*.pt"))
    assert (exp.checkpoint_dir / "final_model.pt").exists()          # final writes are not filtered here


def test_a_final_checkpoint_that_cannot_be_written_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    """The disk stays full to the end: every checkpoint write fails, the final one included; the
    run ends with one line naming the file and the reason, and exit 2."""
    import errno
    import mpn_dqn.replay.snapshot as snapshot_mod
    import mpn_dqn.driver.experiment as experiment_mod
    real = snapshot_mod.write_atomic

    def full(path, data):
        if str(path).endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)
    monkeypatch.setattr(snapshot_mod, "write_atomic", full)
    monkeypatch.setattr(experiment_mod, "write_atomic", full)
    rc = main(["train-neurogym", "--num-actors", "0", "--env-name", PDM, "--num-episodes", "8",
               "--envs-per-actor", "2", "--trials-per-episode", "2", "--learning-starts", "4",
               "--trial-batch-size", "4", "--hidden-dim", "4", "--eval-trials", "0", "--print-freq", "4",
               "--checkpoint-freq", "4", "--experiments-dir", str(tmp_path), "--experiment-name", "full"])
    assert rc == 2
    msg = _one_line(capsys.readouterr().err)
    assert "final_model.pt" in msg and "No space left on device" in msg and "`resume`" in msg, msg
    assert not list((tmp_path / "full" / "checkpoints").glob("*.pt"))
    heartbeat = json.loads((tmp_path / "full" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "failed"


def test_an_experiments_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "0",
                 "--experiments-dir", str(f)]) == 2
    assert "is a file" in _one_line(capsys.readouterr().err)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access                  # root may write anywhere: the permission is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    assert main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "0",
                 "--experiments-dir", str(ro / "exps")]) == 2
    assert "cannot write in" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "0",
                 "--experiments-dir", str(tmp_path), "--experiment-name", "n" * 300]) == 2
    assert "at most 200" in _one_line(capsys.readouterr().err)
