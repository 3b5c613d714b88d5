"""Reliability at the edges, each case run through the real program: ``eval`` streams its
episodes (constant memory) and shows progress, and says in one line when ``eval.json`` cannot
be written; ``resume`` checks the actor count against this machine's CPUs and the whole
network and replay layout against the checkpoint before it writes anything, and continues
from ``--checkpoint FILE``; a run killed before its first checkpoint gets advice that works;
a second ``train`` of a live experiment names the driver that holds it; the collector refuses
a network whose input size is not the task's observation size."""
import json
import os
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

from mpn_dqn.driver.cli.parser import main
from mpn_dqn.driver.experiment import Experiment, load_checkpoint
from tests.helpers import copy_experiment, sigkill_when

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PDM = "PerceptualDecisionMaking-v0"
TINY = ["train-neurogym", "--num-actors", "0", "--env-name", PDM, "--num-episodes", "12",
        "--envs-per-actor", "2", "--trials-per-episode", "2", "--learning-starts", "4",
        "--trial-batch-size", "4", "--hidden-dim", "4", "--eval-trials", "0", "--print-freq", "4",
        "--checkpoint-freq", "4", "--replay-snapshot-every", "8"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return env


def _run(argv, timeout=120):
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def _files(root: Path) -> dict:
    """Every path under ``root``; of each file its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _one_line(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edges")
    assert main([*TINY, "--experiments-dir", str(root), "--experiment-name", "tiny"]) == 0
    return root / "tiny"


# --- eval -----------------------------------------------------------------------------------

def test_eval_memory_does_not_grow_with_the_episode_count():
    """Running sums, not a list of every trial: the peak of 10x the episodes is about the same."""
    from mpn_dqn.actors.evaluate import evaluate
    from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
    from mpn_dqn.common.tasks import task_dims
    obs_dim, num_actions = task_dims(PDM, 100)
    spec = NetSpec(core="mpn", obs_dim=obs_dim, num_actions=num_actions, hidden_dim=4)
    params = export_params(QNetwork(spec))

    def run(num_trials: int) -> dict:
        return evaluate(spec, params, env_name=PDM, dt=100, num_trials=num_trials,
                        trials_per_episode=2, num_envs=4)

    def peak(num_trials: int) -> int:
        tracemalloc.start()
        res = run(num_trials)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert res["trials"] >= num_trials
        return top

    run(2)                                       # warm-up: compiled kernels, the cached ceiling
    small, large = peak(50), peak(500)
    assert large < 1.5 * small + 50_000, (small, large)


@pytest.mark.slow
def test_eval_shows_progress_while_it_runs(trained, tmp_path):
    exp = copy_experiment(trained, tmp_path)
    code = ("import sys, mpn_dqn.driver.cli.commands as c; c.EVAL_PROGRESS_S = 0.2; from mpn_dqn.driver.cli.parser import main; "
            f"sys.exit(main(['eval', '--experiments-dir', {str(exp.parent)!r}, '--experiment-name', "
            "'tiny', '--num-eval-episodes', '1500']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("eval: ")]
    assert lines and "/1500 episodes" in lines[0] and "accuracy so far" in lines[0], r.stdout[-2000:]
    assert r.stdout.index(lines[-1]) < r.stdout.index("| accuracy")      # progress, then the table


@pytest.mark.slow
def test_eval_that_cannot_save_prints_the_table_and_one_line(trained, tmp_path):
    exp = copy_experiment(trained, tmp_path)
    (exp / "eval.json").mkdir()                  # where eval.json goes: a directory, so the rename fails
    (exp / "eval.json" / "x").write_text("x")
    before = _files(tmp_path)
    r = _run(["eval", "--experiments-dir", str(exp.parent), "--experiment-name", "tiny",
              "--num-eval-episodes", "5"])
    assert r.returncode == 2
    msg = _one_line(r.stderr)
    assert "could not save" in msg and "eval.json" in msg and "Is a directory" in msg, msg
    assert "resume" not in msg
    assert "| accuracy" in r.stdout
    assert _files(tmp_path) == before


# --- resume ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_asking_for_more_actors_than_cpus_is_refused_and_writes_nothing(trained, tmp_path):
    exp = copy_experiment(trained, tmp_path)
    cfg = json.loads((exp / "config.json").read_text())
    n = os.cpu_count() or 1                      # n actors + the learner: one CPU too many
    (exp / "config.json").write_text(json.dumps(dict(cfg, num_actors=n)))
    before = _files(tmp_path)
    r = _run(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", "tiny",
              "--num-episodes", "100"])
    assert r.returncode == 2
    msg = _one_line(r.stderr)
    assert f"num_actors {n}" in msg and f"needs {n + 1} CPUs" in msg and "set num_actors" in msg, msg
    assert _files(tmp_path) == before            # no lock file, no config.json rewrite, no Ray


@pytest.mark.parametrize("field,value", [("lambda_max", 0.99), ("buffer_size", 1000)])
def test_resume_refuses_a_config_whose_network_or_replay_differs_from_the_checkpoint(
        trained, tmp_path, capsys, field, value):
    exp = copy_experiment(trained, tmp_path)
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg[field] != value
    (exp / "config.json").write_text(json.dumps(dict(cfg, **{field: value})))
    before = _files(tmp_path)
    assert main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", "tiny",
                 "--num-episodes", "100"]) == 2
    msg = _one_line(capsys.readouterr().err)
    assert f"{field} = {cfg[field]!r}" in msg and "config.json says" in msg, msg
    assert _files(tmp_path) == before


def test_resume_from_a_chosen_checkpoint(trained, tmp_path, capsys):
    exp = copy_experiment(trained, tmp_path)
    older = Experiment(exp.parent, "tiny").checkpoints_newest_first()[-1]      # not the newest
    ck = load_checkpoint(older)
    assert ck["counters"]["episodes"] < load_checkpoint(exp / "checkpoints" / "final_model.pt")["counters"]["episodes"]
    assert main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", "tiny",
                 "--checkpoint", older.name, "--num-episodes", str(ck["counters"]["episodes"] + 4)]) == 0
    assert f"from {older.name}" in capsys.readouterr().out
    res = json.loads((exp / "resume.json").read_text())
    assert res["checkpoint"] == str(older) and res["counters"] == ck["counters"]


# --- a live driver, and one killed before its first checkpoint ------------------------------

@pytest.mark.slow
def test_a_second_train_of_a_live_experiment_names_the_driver(trained, tmp_path):
    exp = copy_experiment(trained, tmp_path)
    with Experiment(exp.parent, "tiny").lock():          # this test process is the live driver
        before = _files(tmp_path)
        r = _run([*TINY, "--experiments-dir", str(exp.parent), "--experiment-name", "tiny"])
        assert r.returncode == 2
        msg = _one_line(r.stderr)
        assert f"is in use by pid {os.getpid()} on" in msg, msg
        assert _files(tmp_path) == before


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_started_again(tmp_path):
    name = "early"
    exp = Experiment(tmp_path, name)
    cmd = [sys.executable, "main.py", *TINY, "--num-episodes", "100000", "--checkpoint-freq", "100000",
           "--checkpoint-minutes", "60", "--experiments-dir", str(tmp_path), "--experiment-name", name]
    with open(tmp_path / "train.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                             start_new_session=True)
        sigkill_when(p, lambda: bool(exp.read_metrics()), 120, tmp_path / "train.log")
    assert not exp.checkpoints_newest_first()
    for argv in (["resume", "--experiments-dir", str(tmp_path), "--experiment-name", name],
                 [*TINY, "--experiments-dir", str(tmp_path), "--experiment-name", name]):
        before = _files(tmp_path)
        r = _run(argv)
        assert r.returncode == 2, argv
        msg = _one_line(r.stderr)
        assert "no checkpoint" in msg and "--overwrite" in msg, msg
        assert _files(tmp_path) == before
    # the advice works
    r = _run([*TINY, "--num-episodes", "4", "--experiments-dir", str(tmp_path), "--experiment-name", name,
              "--overwrite"])
    assert r.returncode == 0, r.stderr[-2000:]


# --- the collector --------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [-1, 1])
def test_the_collector_refuses_a_network_of_another_observation_size(delta):
    from mpn_dqn.actors.collector import TrialCollector
    from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
    from mpn_dqn.common.tasks import task_dims
    obs_dim, num_actions = task_dims(PDM, 100)
    spec = NetSpec(core="mpn", obs_dim=obs_dim + delta, num_actions=num_actions, hidden_dim=4)
    with pytest.raises(ValueError, match=f"observes \\({obs_dim},\\) but the network takes "
                                         f"\\({obs_dim + delta},\\)"):
        TrialCollector(PDM, 100, spec, export_params(QNetwork(spec)), num_envs=2)


# --- metrics.jsonl --------------------------------------------------------------------------

def test_a_metrics_line_cut_by_a_crash_is_skipped_and_the_next_record_is_whole(tmp_path):
    exp = Experiment(tmp_path, "cut")
    exp.dir.mkdir()
    exp.append_metrics({"episode": 1})
    with open(exp.metrics_path, "a") as fh:
        fh.write('{"episode": 2, "accur')        # what a kill mid-append leaves
    assert exp.read_metrics() == [{"episode": 1}]
    exp.append_metrics({"episode": 3})          # e.g. the resumed run's first record
    assert exp.read_metrics() == [{"episode": 1}, {"episode": 3}]
