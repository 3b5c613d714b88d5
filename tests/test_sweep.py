"""``sweep``: a grid of trainings as Ray Tune trials.

* the grid is validated before anything is written: misuse is one line and exit 2;
* tasks x cores x --grid values x seeds expand to named trials with their resources;
* a real sweep on the shared Ray session runs single-process and Ray-actor trials (each in its
  own placement group) and writes results.json / results.md / learning_curves.png;
* a sweep whose driver is SIGKILLed continues when the same command runs again: the finished
  trial is kept, the interrupted one continues from its checkpoint;
* results rows merge (a newer row replaces one of the same key).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpn_dqn.driver.cli.parser import main
from mpn_dqn.driver.observe.results import markdown, merge_rows, time_to_pct
from mpn_dqn.driver.runtime.sweep import SweepError, SweepSpec, trial_bundles
from tests.helpers import sigkill_when

ROOT = Path(__file__).resolve().parent.parent
PDM = "PerceptualDecisionMaking-v0"
TINY = ["--num-episodes", "24", "--hidden-dim", "16", "--trial-batch-size", "8", "--learning-starts", "16",
        "--envs-per-actor", "4", "--trials-per-episode", "4", "--print-freq", "4", "--eval-trials", "40"]


# -- the grid --------------------------------------------------------------------------------------

def test_grid_expands_tasks_cores_values_and_seeds_into_named_trials(tmp_path):
    spec = SweepSpec(name="g", tasks=[PDM, "GoNogo-v0"], seeds=[0, 1], cores=["mpn", "gru"],
                     grid={"n-step": ["1", "5"], "learn-plasticity": ["true", "false"]},
                     train_args=["--num-actors", "0"], sweeps_dir=str(tmp_path))
    trials = spec.trials
    assert len(trials) == 2 * 2 * 2 * 2 * 2
    names = [t.experiment_name for t in trials]
    assert len(set(names)) == len(names)
    assert "PerceptualDecisionMaking-gru-n-step1-no-learn-plasticity-s1" in names
    t = next(t for t in trials if t.experiment_name == "GoNogo-mpn-n-step5-learn-plasticity-s0")
    cfg = t.config(str(spec.experiments_dir))
    assert (cfg.env_name, cfg.core, cfg.seed, cfg.n_step, cfg.learn_plasticity) == ("GoNogo-v0", "mpn", 0, 5, True)
    assert cfg.dt == 100 and cfg.num_actors == 0
    assert t.variant == "--num-actors 0 --n-step 5 --learn-plasticity"
    assert not tmp_path.joinpath("g").exists()                # building the grid writes nothing


def test_trial_resources_one_cpu_per_actor_plus_the_learner(tmp_path):
    spec = SweepSpec(name="r", tasks=[PDM], grid={"num-actors": ["0", "3"]}, sweeps_dir=str(tmp_path))
    single, three = (t.config(str(spec.experiments_dir)) for t in spec.trials)
    assert trial_bundles(single) == [{"CPU": 1.0}]
    assert trial_bundles(three) == [{}, {"CPU": 1.0}] + [{"CPU": 1.0}] * 3
    assert trial_bundles(three, cluster_gpus=1)[1] == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize("kw, words", [
    (dict(tasks=[]), "no task"),
    (dict(tasks=["Nope-v0"]), "not a NeuroGym task"),
    (dict(seeds=[0, 0]), "twice"),
    (dict(cores=["rnn"]), "choose from"),
    (dict(grid={"seed": ["1", "2"]}), "sets --seed itself"),
    (dict(grid={"nstep": ["1"]}), "did you mean n-step"),
    (dict(grid={"learn-plasticity": ["yes"]}), "true or false"),
    (dict(train_args=["--core", "gru"]), "sets it itself"),
    (dict(train_args=["--n-step", "0"]), "--n-step must be >= 1"),
    (dict(train_args=["--bogus"]), "unrecognized"),
    (dict(max_concurrent=0), "--max-concurrent"),
    (dict(name="a/b"), "--sweep-name"),
])
def test_a_bad_grid_is_refused_at_construction(tmp_path, kw, words):
    args = dict(name="bad", tasks=[PDM], sweeps_dir=str(tmp_path)) | kw
    with pytest.raises(SweepError, match=words):
        SweepSpec(**args)


def test_cli_misuse_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    d = tmp_path / "sweeps"
    for argv in (["--env-name", PDM, "--battery"], ["--env-name", PDM, "--grid", "n-step"],
                 ["--env-name", "ToneDetection-v0", "--", "--dt", "100"],
                 ["--env-name", PDM, "--", "--num-actors", "64"]):
        assert main(["sweep", "--sweeps-dir", str(d), "--sweep-name", "x", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sweep:") and "\n" not in err, err
    assert not d.exists()


def test_dry_run_lists_the_trials(tmp_path, capsys):
    assert main(["sweep", "--battery", "--seeds", "0", "1", "--cores", "mpn", "gru", "--sweeps-dir",
                 str(tmp_path), "--sweep-name", "b", "--dry-run", "--", "--num-actors", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("72 trials")
    assert any(line.startswith("PulseDecisionMaking-gru-s1: dt 10, 1 actors, 2 CPUs") for line in out)
    assert not (tmp_path / "b").exists()


# -- results ---------------------------------------------------------------------------------------

def test_rows_merge_by_task_dt_core_seed_and_variant():
    a = {"task": "T", "dt": 100, "core": "mpn", "seed": 0, "variant": "defaults", "accuracy": 0.5}
    b = dict(a, seed=1)
    newer = dict(a, accuracy=0.9)
    rows = merge_rows([a, b], [newer, dict(a, core="gru")])
    assert [r["accuracy"] for r in rows if r["core"] == "mpn"] == [0.9, 0.5]
    assert len(rows) == 3


def _row_at(task: str, seed: int = 0, core: str = "mpn", variant: str = "defaults", cpus: int = 2, **options):
    from mpn_dqn.common.config import TrainConfig
    cfg = TrainConfig(env_name=task, seed=seed, core=core, num_actors=max(1, cpus - 1)).to_dict()
    cfg.update(options)
    return {"task": task, "dt": cfg["dt"], "core": core, "seed": seed, "variant": variant, "status": "ok",
            "accuracy": 0.5, "ceiling": 1.0, "pct_ceiling": 50.0, "config": cfg, "machine": {"cpus": cpus}}


def test_a_rows_variant_is_what_its_config_differs_in_from_todays_defaults():
    from mpn_dqn.driver.observe.results import variant_of
    assert variant_of(_row_at(PDM, variant="--buffer-size 20000")) == "defaults"
    assert variant_of(_row_at(PDM, buffer_size=500, learn_plasticity=False)) == \
        "--no-learn-plasticity --buffer-size 500"
    assert variant_of(_row_at("PulseDecisionMaking-v0", dt=100)) == "--dt 100"
    old = _row_at(PDM)
    del old["config"]["plasticity_per_unit"]             # written before the option existed: one pair
    del old["config"]["replay_shards"]                   # ... whose default is what it did
    assert variant_of(old) == "--no-plasticity-per-unit"
    assert variant_of(_row_at(PDM, cpus=4)) == "defaults"          # 3 actors are 4 CPUs' default
    assert variant_of(_row_at(PDM, cpus=4, num_actors=1)) == "--num-actors 1"
    assert variant_of(_row_at(PDM, experiment_name="x", print_freq=7)) == "defaults"
    assert variant_of({"variant": "--n-step 5"}) == "--n-step 5"   # no config: as stored


def test_rows_of_the_same_config_merge_whatever_they_were_called_when_they_ran():
    a = _row_at(PDM, variant="--buffer-size 20000")
    b = dict(_row_at(PDM), accuracy=0.9)
    rows = merge_rows([a, _row_at(PDM, buffer_size=500)], [b])
    assert [(r["variant"], r["accuracy"]) for r in rows] == [("defaults", 0.9), ("--buffer-size 500", 0.5)]


def test_a_thinned_curve_is_short_and_reaches_every_accuracy_when_the_whole_curve_does():
    import random
    from mpn_dqn.driver.observe.results import CURVE_POINTS, thin_curve
    rng = random.Random(0)
    curve = [[float(t), 100 * t, min(1.0, t / 3000 + rng.uniform(-0.2, 0.2))] for t in range(3000)]
    thin = thin_curve(curve)
    assert len(thin) < 2 * CURVE_POINTS and thin[0] == curve[0] and thin[-1] == curve[-1]
    recs = lambda c: [{"wall_time": w, "env_steps": e, "accuracy": a} for w, e, a in c]  # noqa: E731
    for ceiling in (0.3, 0.6, 0.9, 1.0):
        assert time_to_pct(recs(thin), ceiling) == time_to_pct(recs(curve), ceiling)
    assert thin_curve(curve[:5]) == curve[:5]


def test_the_battery_table_puts_mpn_and_gru_side_by_side_and_lists_tasks_not_run():
    rows = [dict(_row_at("GoNogo-v0", seed=s), accuracy=1.0, pct_ceiling=100.0) for s in (0, 1, 2)]
    rows += [dict(_row_at("GoNogo-v0", core="gru"), accuracy=0.9, pct_ceiling=90.0)]
    rows += [dict(_row_at("GoNogo-v0", buffer_size=500), accuracy=0.2, pct_ceiling=20.0)]
    md = markdown(merge_rows([], rows))
    battery = md.split("## The battery at the defaults")[1].split("## At the defaults")[0]
    line = next(ln for ln in battery.splitlines() if ln.startswith("| GoNogo |"))
    assert "| 1.000 ± 0.000 (3) | 100.0 %, 100.0 % |" in line and "| 0.900 (1) | 90.0 %, 90.0 % |" in line
    assert "| ReadySetGo | - |" in battery and "not run" in battery
    assert "MPN at ≥ 95 % of the ceiling on every seed on 1 of the 1 learnable tasks it ran (1 of them " \
           "with 3 or more seeds); GRU at ≥ 95 % of the ceiling on every seed on 0 of the 1" in battery
    assert "0.200" not in battery                                  # a variant is not the defaults
    assert "| GoNogo | 100 | mpn | --buffer-size 500 | 0 | 0.200 |" in md.split("## Other variants")[1]


def test_skip_existing_leaves_out_the_trials_with_a_finished_row_and_needs_a_results_dir(tmp_path, capsys):
    from mpn_dqn.driver.experiment import machine
    kw = dict(name="p", tasks=[PDM, "GoNogo-v0"], seeds=[0, 1], sweeps_dir=str(tmp_path / "sw"),
              results_dir=str(tmp_path / "res"))
    full = SweepSpec(**kw)
    done = full.config_of(full.trials[0])
    row = {"task": done.env_name, "dt": done.dt, "core": done.core, "seed": done.seed, "status": "ok",
           "config": done.to_dict(), "machine": machine()}
    failed = dict(row, seed=1, status="no summary.json (the run did not finish)", config=dict(row["config"], seed=1))
    other = dict(row, task="GoNogo-v0", config=dict(row["config"], env_name="GoNogo-v0", buffer_size=500))
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "results.json").write_text(json.dumps({"rows": [row, failed, other]}))
    part = SweepSpec(**kw, skip_existing=True)
    assert part.skipped == full.trials[:1] and part.trials == full.trials[1:]
    assert part.identity() == full.identity()          # the same command resumes the same sweep
    assert main(["sweep", "--env-name", PDM, "GoNogo-v0", "--seeds", "0", "1", "--sweeps-dir",
                 str(tmp_path / "sw"), "--sweep-name", "p", "--results-dir", str(tmp_path / "res"),
                 "--skip-existing", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "leaving out 1 trials" in out and "3 trials;" in out and "PerceptualDecisionMaking-mpn-s0:" not in out
    assert main(["sweep", "--env-name", PDM, "--sweeps-dir", str(tmp_path / "sw"), "--skip-existing",
                 "--dry-run"]) == 2
    assert "--skip-existing needs --results-dir" in capsys.readouterr().err
    every = [dict(row, task=c.env_name, dt=c.dt, seed=c.seed, config=c.to_dict())
             for c in map(full.config_of, full.trials)]
    (tmp_path / "res" / "results.json").write_text(json.dumps({"rows": every}))
    assert main(["sweep", "--env-name", PDM, "GoNogo-v0", "--seeds", "0", "1", "--sweeps-dir",
                 str(tmp_path / "sw"), "--sweep-name", "p", "--results-dir", str(tmp_path / "res"),
                 "--skip-existing"]) == 0                # nothing left: no Ray, nothing written
    assert "nothing left to run" in capsys.readouterr().out and not (tmp_path / "sw").exists()


def test_time_to_95_is_the_first_record_at_95_percent_of_the_ceiling():
    recs = [{"wall_time": t, "env_steps": 10 * t, "accuracy": a} for t, a in ((1, 0.5), (2, 0.93), (3, 0.96))]
    assert time_to_pct(recs, 1.0) == {"time_to_95_s": 3, "env_steps_to_95": 30}
    assert time_to_pct(recs, 0.9) == {"time_to_95_s": 2, "env_steps_to_95": 20}
    assert time_to_pct(recs, None)["time_to_95_s"] is None


def test_markdown_says_when_a_task_cannot_be_learned_and_when_runs_failed():
    row = {"task": "DelayMatchCategory-v0", "dt": 100, "core": "mpn", "seed": 0, "variant": "defaults",
           "status": "ok", "accuracy": 0.5, "pct_ceiling": None, "ceiling": 0.5, "eval_trials": 100}
    failed = dict(row, seed=1, status="no summary.json (the run did not finish)")
    md = markdown([row, failed])
    assert "not learnable as registered" in md and "0 (+1 failed)" in md


# -- real sweeps -----------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_ray_runs_single_process_and_actor_trials_and_writes_results(ray_session, tmp_path, capsys):
    from mpn_dqn.driver.runtime.sweep import run_sweep
    spec = SweepSpec(name="real", tasks=[PDM], seeds=[0], grid={"num-actors": ["0", "1"]},
                     train_args=TINY, sweeps_dir=str(tmp_path / "sweeps"), results_dir=str(tmp_path / "res"))
    out = run_sweep(spec, command="python main.py sweep ...")
    assert out["trials"] == 2 and out["ok"] == 2, capsys.readouterr()
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 and data["commands"] == ["python main.py sweep ..."]
    for r in rows:
        assert r["status"] == "ok" and r["eval_trials"] >= 40
        assert abs(r["accuracy"] * r["eval_trials"] - round(r["accuracy"] * r["eval_trials"])) < 1e-6
        assert r["ceiling"] == pytest.approx(0.896, abs=0.02) and r["best_trivial"] is not None
        assert r["config"]["seed"] == r["seed"] and r["env_steps"] > 0 and r["commit"]
        # one record per --print-freq / 1 % of the run; on Ray a fast actor can deliver the whole
        # tiny run in one poll, so only the single-process row is sure to hold several points
        assert r["curve"] and all(len(p) == 3 and 0 <= p[2] <= 1 for p in r["curve"])
        assert len(r["curve"]) >= (2 if r["config"]["num_actors"] == 0 else 1)
        exp = Path(r["experiment"])
        assert exp.parent == spec.experiments_dir and (exp / "checkpoints" / "selected_model.pt").exists()
        assert "sweep trial" in (exp / "train.log").read_text()
    assert {r["config"]["num_actors"] for r in rows} == {0, 1}
    md = (tmp_path / "res" / "results.md").read_text()
    assert md.count("| PerceptualDecisionMaking | 100 | mpn |") == 2           # one line per variant
    assert (tmp_path / "res" / "learning_curves.png").stat().st_size > 1000
    log = capsys.readouterr().out
    assert log.count("[sweep] started") == 2 and "2/2 done" in log
    # the same command again: nothing is re-run, the results are the same
    again = run_sweep(spec, command="python main.py sweep ...")
    assert again["ok"] == 2
    assert all((Path(r["experiment"]) / "train.log").read_text().count("sweep trial") == 1 for r in rows)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_driver_killed_then_the_same_command_continues(ray_session, tmp_path):
    # the sweep's driver is a separate process on the test session's Ray (--address): killing it
    # kills its trials (Ray ends the actors of a dead driver); the second run is a new driver
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "main.py", "sweep", "--env-name", PDM, "--seeds", "0", "1", "--max-concurrent", "1",
           "--sweeps-dir", str(tmp_path), "--sweep-name", "k", "--address", address, "--",
           *TINY[2:], "--num-actors", "0", "--num-episodes", "1000000", "--time-limit-minutes", "0.12",
           "--checkpoint-freq", "4"]
    first, second = (tmp_path / "k" / "experiments" / f"PerceptualDecisionMaking-mpn-s{s}" for s in (0, 1))
    log = open(tmp_path / "sweep1.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        sigkill_when(p, lambda: (first / "summary.json").exists()
                     and bool(list((second / "checkpoints").glob("checkpoint_*.pt"))), 150,
                     tmp_path / "sweep1.log")
    finally:
        log.close()
    assert not (second / "summary.json").exists()
    q = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240,
                       start_new_session=True)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "Resuming sweep k" in q.stdout and "1 of 2 trials already finished" in q.stdout
    assert (first / "train.log").read_text().count("sweep trial") == 1       # kept, not re-run
    log2 = (second / "train.log").read_text()
    assert log2.count("sweep trial") == 2 and "continuing from checkpoint_" in log2
    rows = json.loads((tmp_path / "k" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # the continued run's wall time is the configured limit, not two of them
    assert rows[1]["wall_s"] < 0.12 * 60 * 1.6


def test_results_command_rebuilds_the_table_from_results_json(tmp_path, capsys):
    from mpn_dqn.driver.observe.results import write_report
    row = {"task": "GoNogo-v0", "dt": 100, "core": "mpn", "seed": 0, "variant": "defaults", "status": "ok",
           "accuracy": 0.9, "pct_ceiling": 90.0, "ceiling": 1.0, "eval_trials": 100,
           "curve": [[1.0, 10, 0.5], [2.0, 20, 0.96]]}
    write_report(tmp_path, [row])
    (tmp_path / "results.md").unlink()
    assert main(["results", "--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| GoNogo | 100 | mpn | defaults | 0 | 0.900 | 90.0 %, 90.0 % |" in md
    assert "| 2 (1/1) |" in md                                   # time to 95 % of the current ceiling 1.0
    assert main(["results", "--results-dir", str(tmp_path / "none")]) == 2


def test_the_commit_is_dirty_only_when_code_changed(tmp_path):
    """Result files written into the tree (docs/results.*) do not mark a row's code as dirty."""
    from mpn_dqn.driver.observe.results import git_commit
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results.md").write_text("rows\n")
    run("add", "."), run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git_commit(tmp_path)
    (tmp_path / "results.md").write_text("more rows\n")
    assert git_commit(tmp_path) == head and "+" not in head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"
