"""The command line, run in-process through ``driver.cli.parser.main(argv)``.

Misuse must exit 2 with one line on stderr and write nothing; ``--help`` documents every
option; a tiny single-process run goes through train -> eval -> render -> resume.
"""
import json
import os
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.cli.parser import main
from mpn_dqn.driver.experiment import payload_digest

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

PDM = "PerceptualDecisionMaking-v0"


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _one_line(err: str) -> str:
    err = err.strip()
    assert err, "expected a message on stderr"
    assert "\n" not in err, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    return err


# --- misuse -----------------------------------------------------------------------------------

# A train-neurogym run that would be quick if a misuse slipped through (the case's own options
# come after these, so they win).
GUARD = ["--num-actors", "0", "--num-episodes", "1", "--eval-trials", "0", "--envs-per-actor", "1",
         "--hidden-dim", "4", "--experiment-name", "guard"]

MISUSE = [
    # (id, argv after the command, substrings the message must hold)
    ("unknown-command", ["frobnicate"], ["invalid choice", "frobnicate", "train-neurogym"]),
    ("unknown-option", ["train-neurogym", *GUARD, "--frobnicate", "3"],
     ["unrecognized arguments", "--frobnicate"]),
    ("misspelt-option", ["train-neurogym", *GUARD, "--hiden-dim", "16"],
     ["--hiden-dim", "did you mean --hidden-dim"]),
    ("misspelt-eval-option", ["eval", "--experiment-name", "x", "--num-eval-episode", "3"],
     ["did you mean --num-eval-episodes"]),
    ("wrong-type", ["train-neurogym", *GUARD, "--hidden-dim", "abc"], ["--hidden-dim", "abc"]),
    ("negative-buffer", ["train-neurogym", *GUARD, "--buffer-size", "-5"], ["--buffer-size", ">= 1"]),
    ("zero-batch", ["train-neurogym", *GUARD, "--trial-batch-size", "0"], ["--trial-batch-size", ">= 1"]),
    ("lambda-above-1", ["train-neurogym", *GUARD, "--lambda-decay", "1.5"], ["--lambda-decay", "<= 1"]),
    ("chunk-zero", ["train-neurogym", *GUARD, "--bptt-chunk-size", "0"], ["--bptt-chunk-size", ">= 1"]),
    ("unknown-env", ["train-neurogym", *GUARD, "--env-name", "PerceptualDecisionMaking-v9"],
     ["PerceptualDecisionMaking-v9", "did you mean", PDM]),
    ("unknown-device", ["train-neurogym", *GUARD, "--device", "tpu"], ["--device", "tpu"]),
    ("cuda-without-gpu", ["train-neurogym", *GUARD, "--device", "cuda"], ["cuda", "--device cpu"]),
    ("epsilon-end-above-start", ["train-neurogym", *GUARD, "--epsilon-start", "0.2", "--epsilon-end", "0.5"],
     ["--epsilon-end", "--epsilon-start"]),
    ("bad-experiment-name", ["train-neurogym", *GUARD, "--experiment-name", "../escape"],
     ["--experiment-name"]),
    ("existing-experiment", ["train-neurogym", *GUARD, "--experiment-name", "taken"],
     ["already exists", "--overwrite"]),
    ("eval-missing", ["eval", "--experiment-name", "nope"], ["no experiment 'nope'", "taken"]),
    ("render-missing", ["render", "--experiment-name", "nope", "--output", "OUT.gif"],
     ["no experiment 'nope'"]),
    ("resume-missing", ["resume", "--experiment-name", "nope"], ["no experiment 'nope'"]),
    ("eval-zero-episodes", ["eval", "--experiment-name", "taken", "--num-eval-episodes", "0"],
     ["--num-eval-episodes"]),
    ("render-png", ["render", "--experiment-name", "taken", "--output", "OUT.png"], [".gif", "out.png"]),
    ("render-no-dir", ["render", "--experiment-name", "taken", "--output", "NODIR/x.gif"],
     ["does not exist"]),
    ("eval-no-checkpoint", ["eval", "--experiment-name", "taken"], ["no checkpoint"]),
]


@pytest.mark.parametrize("case_id,argv,expected", MISUSE, ids=[c[0] for c in MISUSE])
def test_misuse_exits_2_with_one_line_and_writes_nothing(case_id, argv, expected, tmp_path, capsys,
                                                        monkeypatch):
    if case_id == "cuda-without-gpu":          # the same check on a machine that has a GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exps = tmp_path / "exps"
    exps.mkdir()
    # an existing experiment (config only, no checkpoints) for the cases that need one
    (exps / "taken" / "checkpoints").mkdir(parents=True)
    TrainConfig(experiment_name="taken").save(str(exps / "taken" / "config.json"))
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("NODIR", str(tmp_path / "nodir"))
            for a in argv]
    before = _snapshot(tmp_path)
    rc = main([*argv, "--experiments-dir", str(exps)])
    out, err = capsys.readouterr()
    assert rc == 2
    msg = _one_line(err)
    for s in expected:
        assert s in msg, f"{s!r} not in {msg!r}"
    assert _snapshot(tmp_path) == before


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "train-neurogym" in capsys.readouterr().out


# --- help -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [None, "train-neurogym", "eval", "render", "resume"])
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if command is None:
        for c in ("train-neurogym", "eval", "render", "resume"):
            assert c in out
    if command == "train-neurogym":
        missing = [f.name for f in fields(TrainConfig) if "--" + f.name.replace("_", "-") not in out]
        assert not missing, f"options missing from --help: {missing}"
    if command in ("eval", "render", "resume"):
        assert "--experiment-name" in out and "--experiments-dir" in out


# --- end to end -------------------------------------------------------------------------------

TRAIN = ["train-neurogym", "--num-actors", "0", "--env-name", PDM, "--num-episodes", "20",
         "--envs-per-actor", "4", "--learning-starts", "16", "--trial-batch-size", "8",
         "--eval-trials", "40", "--print-freq", "5", "--checkpoint-freq", "10", "--hidden-dim", "16",
         "--plot-training"]
METRIC_KEYS = ("episode", "env_steps", "trials", "reward", "accuracy", "pct_ideal", "loss", "epsilon",
               "updates", "weights_version", "policy_lag", "env_steps_per_s", "updates_per_s",
               "replay_size", "num_actors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny single-process run; tests work on copies of its directory."""
    root = tmp_path_factory.mktemp("trained")
    rc = main([*TRAIN, "--experiments-dir", str(root), "--experiment-name", "tiny"])
    assert rc == 0
    return root / "tiny"


def _copy(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "exps" / trained.name
    shutil.copytree(trained, dst)          # copy2: keeps mtimes (resume picks the newest checkpoint)
    return dst


def _metrics(exp_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines() if line]


def _counters(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["counters"]


def test_train_writes_config_metrics_checkpoints_and_plots(trained):
    cfg = TrainConfig.load(str(trained / "config.json"))
    assert (cfg.env_name, cfg.num_episodes, cfg.hidden_dim, cfg.num_actors) == (PDM, 20, 16, 0)
    assert (cfg.envs_per_actor, cfg.trial_batch_size, cfg.learning_starts) == (4, 8, 16)
    assert cfg.experiment_name == "tiny" and cfg.plot_training

    recs = _metrics(trained)
    assert len(recs) >= 2
    for r in recs:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        assert r["num_actors"] == 0
    eps = [r["episode"] for r in recs]
    assert eps == sorted(eps) and eps[-1] >= 20
    assert recs[-1]["updates"] > 0
    # the learner reports its loss every 5 updates: a window that spans 5 updates has one
    spans = [(a["updates"], b) for a, b in zip(recs, recs[1:]) if b["updates"] - a["updates"] >= 5]
    assert spans and all(b["loss"] is not None for _, b in spans)
    assert recs[-1]["trials"] >= 20 * cfg.trials_per_episode

    ck_dir = trained / "checkpoints"
    periodic = sorted(ck_dir.glob("checkpoint_*.pt"))
    assert periodic, list(ck_dir.iterdir())
    for name in ("best_model.pt", "final_model.pt"):
        assert (ck_dir / name).exists()
    for path in [*periodic, ck_dir / "best_model.pt", ck_dir / "final_model.pt"]:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert {"learner", "spec", "config", "counters"} <= set(ck)
        if path.name.startswith("checkpoint_"):
            assert int(path.stem.split("_")[1]) == ck["counters"]["episodes"]
    final = _counters(ck_dir / "final_model.pt")
    assert final["episodes"] == recs[-1]["episode"] and final["updates"] == recs[-1]["updates"]

    png = trained / "plots" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_hands_over_the_model_that_was_better_on_validation_seeds(trained):
    summary = json.loads((trained / "summary.json").read_text())
    sel = summary["selected_model"]
    val = sel["validation_accuracy"]
    assert set(val) == {"final_model.pt", "best_model.pt"}
    assert sel["checkpoint"] == max(val, key=lambda n: (val[n], n == "final_model.pt"))
    ck_dir = trained / "checkpoints"
    assert (ck_dir / "selected_model.pt").read_bytes() == (ck_dir / sel["checkpoint"]).read_bytes()
    # its reported accuracy is its evaluation on the test seeds, the ones `eval` uses
    test = summary["final_eval"] if sel["checkpoint"] == "final_model.pt" else summary["best_model_eval"]
    assert sel["eval"] == test
    assert summary["best_model_eval"]["episode"] == _counters(ck_dir / "best_model.pt")["episodes"]


def test_eval_writes_eval_json_and_prints_a_table(trained, tmp_path, capsys):
    exp = _copy(trained, tmp_path)
    rc = main(["eval", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--num-eval-episodes", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ev = json.loads((exp / "eval.json").read_text())
    for k in ("env_name", "episodes", "trials", "accuracy", "reward_per_trial", "ideal_accuracy",
              "pct_ideal"):
        assert k in ev, k
    assert ev["env_name"] == PDM and ev["episodes"] == 5 and ev["trials"] == 50
    assert abs(ev["accuracy"] * ev["trials"] - round(ev["accuracy"] * ev["trials"])) < 1e-6   # whole trials
    assert ev["ideal_accuracy"] == pytest.approx(0.896)
    assert ev["pct_ideal"] == pytest.approx(100 * ev["accuracy"] / 0.896)
    assert "| accuracy" in out and "% of ideal" in out and "eval.json" in out


def test_render_writes_an_animated_gif(trained, tmp_path, capsys):
    from PIL import Image
    exp = _copy(trained, tmp_path)
    gif = tmp_path / "episode.gif"
    rc = main(["render", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--output", str(gif), "--max-trials", "1", "--fps", "4"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames > 1
        assert abs(im.info.get("duration", 0) - 250) <= 10       # --fps 4: 250 ms per frame


def test_resume_continues_counters_from_the_checkpoint(trained, tmp_path, capsys):
    exp = _copy(trained, tmp_path)
    before = _metrics(exp)
    ck0 = _counters(exp / "checkpoints" / "final_model.pt")
    # a copy that did not keep mtimes: the oldest periodic checkpoint looks like the newest file
    oldest = min((exp / "checkpoints").glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    assert int(oldest.stem.split("_")[1]) < ck0["episodes"]
    t = (exp / "checkpoints" / "final_model.pt").stat().st_mtime_ns + 10**10
    os.utime(oldest, ns=(t, t))
    rc = main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--num-episodes", "30"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "from final_model.pt" in out
    after = _metrics(exp)
    assert after[:len(before)] == before                     # appended, not rewritten
    new = after[len(before):]
    assert new, "resume wrote no metrics"
    assert new[-1]["episode"] >= 30
    for r in new:                                            # counters continue, never restart
        assert r["episode"] >= ck0["episodes"]               # (a record may precede the next episode)
        assert r["env_steps"] > ck0["env_steps"] and r["trials"] > ck0["trials"]
        assert r["updates"] >= ck0["updates"]
        assert r["weights_version"] > before[-1]["weights_version"]
    assert new[-1]["updates"] > ck0["updates"]
    ck1 = torch.load(exp / "checkpoints" / "final_model.pt", map_location="cpu", weights_only=True)
    assert ck1["counters"]["episodes"] >= 30
    assert ck1["learner"]["updates"] == ck1["counters"]["updates"] > ck0["updates"]
    assert TrainConfig.load(str(exp / "config.json")).num_episodes == 30


def test_resume_to_an_episode_already_reached_exits_2(trained, tmp_path, capsys):
    exp = _copy(trained, tmp_path)
    done = _counters(exp / "checkpoints" / "final_model.pt")["episodes"]
    before = _snapshot(tmp_path)
    rc = main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--num-episodes", str(done)])
    assert rc == 2
    assert str(done) in _one_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


def test_truncated_checkpoint_exits_2_naming_the_file(trained, tmp_path, capsys):
    exp = _copy(trained, tmp_path)
    data = (exp / "checkpoints" / "final_model.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    before = _snapshot(tmp_path)
    rc = main(["eval", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--checkpoint", str(bad)])
    assert rc == 2
    assert str(bad) in _one_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


def test_a_file_that_is_not_a_checkpoint_exits_2_with_one_line(trained, tmp_path, capsys):
    """torch's weights_only refusal spans several lines (and colour codes): still one line."""
    import numpy as np
    exp = _copy(trained, tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"learner": {}, "payload": np.zeros(3)}, other)
    rc = main(["eval", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
               "--checkpoint", str(other)])
    assert rc == 2
    msg = _one_line(capsys.readouterr().err)
    assert str(other) in msg and "\x1b" not in msg


def test_a_dt_the_task_cannot_run_at_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from mpn_dqn.driver.cli.parser import main
    rc = main(["train-neurogym", "--env-name", "ToneDetection-v0", "--dt", "100",
               "--experiments-dir", str(tmp_path / "exps")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "its own dt is 50 ms" in err
    assert not (tmp_path / "exps").exists()


def test_a_live_run_keeps_its_experiment_train_overwrite_and_resume_are_refused(trained, tmp_path, capsys):
    """One driver per experiment: while a process holds the experiment (as a live training does),
    `train --overwrite` of the same name and `resume` are one line + exit 2, and nothing is touched;
    once the holder is gone (killed: the kernel drops its lock), resume goes ahead."""
    import subprocess
    import sys
    exp = _copy(trained, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from mpn_dqn.driver.experiment import Experiment;"
         "cm = Experiment(sys.argv[2], sys.argv[3]).lock(); cm.__enter__(); print('held', flush=True);"
         "time.sleep(60)", str(Path(__file__).resolve().parent.parent), str(exp.parent), exp.name],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(tmp_path)
        for argv in ([*TRAIN, "--overwrite", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name],
                     ["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
                      "--num-episodes", "100000"]):
            assert main(argv) == 2
            err = _one_line(capsys.readouterr().err)
            assert "is in use by pid" in err, err
            assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    done = _counters(exp / "checkpoints" / "final_model.pt")["episodes"]
    assert main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
                 "--num-episodes", str(done + 8)]) == 0          # the lock went with its holder


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(trained, tmp_path, capsys):
    exp = _copy(trained, tmp_path)
    ckdir = exp / "checkpoints"
    final = ckdir / "final_model.pt"
    final.write_bytes(final.read_bytes()[:100])                    # a damaged final_model.pt
    periodic = sorted(ckdir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    newest = periodic[-1]
    newest.write_bytes(newest.read_bytes()[:100])                  # and a damaged newest checkpoint_N
    older = periodic[-2]
    done = _counters(older)["episodes"]
    assert main(["resume", "--experiments-dir", str(exp.parent), "--experiment-name", exp.name,
                 "--num-episodes", str(done + 8)]) == 0
    out = capsys.readouterr().out
    assert f"Warning: checkpoint '{newest}'" in out and "trying the next older checkpoint" in out
    assert "skipped final_model.pt" in out and f"from {older.name}" in out


def test_a_pickle_checkpoint_is_refused_without_torch_advice_to_unpickle(tmp_path, capsys):
    import argparse
    from mpn_dqn.driver.experiment import CheckpointError, load_checkpoint
    bad = tmp_path / "evil.pt"
    torch.save({"learner": argparse.Namespace(x=1), "spec": {}}, bad)   # needs unpickling a class
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert "pickled Python objects" in str(e.value) and "weights_only=False" not in str(e.value)


def test_an_empty_experiment_name_is_refused(tmp_path, capsys):
    assert main([*TRAIN, "--experiments-dir", str(tmp_path), "--experiment-name", ""]) == 2
    assert "--experiment-name ''" in _one_line(capsys.readouterr().err)     # not a random name
    assert not any(tmp_path.iterdir())


def test_the_replay_staleness_diagnostic_is_opt_in_and_leaves_training_draws_alone(tmp_path):
    """With --staleness-every the metrics carry the R2D2 staleness of replay's start state; it draws
    from its own RNG, so the training run is the same draw for draw as one without it."""
    from mpn_dqn.driver.experiment import Experiment
    from mpn_dqn.driver.runtime.local import train_local
    runs = {}
    for name, every in (("off", 0), ("on", 5)):
        cfg = TrainConfig(env_name=PDM, num_actors=0, num_episodes=24, envs_per_actor=4, learning_starts=16,
                          trial_batch_size=8, hidden_dim=16, print_freq=8, eval_trials=0, staleness_every=every,
                          experiments_dir=str(tmp_path), experiment_name=name, record_seconds=0)
        exp = Experiment(tmp_path, name)
        exp.create(cfg)
        train_local(cfg, exp, log=lambda m: None)
        runs[name] = exp.read_metrics()
    assert not any(r.get("staleness_q_gap") is not None for r in runs["off"])
    assert any(r.get("staleness_q_gap") is not None for r in runs["on"])
    assert [r["loss"] for r in runs["off"]] == [r["loss"] for r in runs["on"]]


def test_an_experiment_whose_files_lack_plasticity_per_unit_loads_as_one_pair(tmp_path, capsys):
    """Config and checkpoints without the key describe an MPN with one η and λ for the layer:
    eval and resume build that network, not the per-unit default."""
    root = tmp_path / "exps"
    assert main([*TRAIN, "--num-episodes", "10", "--no-plasticity-per-unit",
                 "--experiments-dir", str(root), "--experiment-name", "pair"]) == 0
    exp = root / "pair"
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg.pop("plasticity_per_unit") is False
    (exp / "config.json").write_text(json.dumps(cfg))
    for path in (exp / "checkpoints").glob("*.pt"):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["config"].pop("plasticity_per_unit", None)
        ck["spec"].pop("plasticity_per_unit", None)
        assert ck["learner"]["online"]["core.eta_per_100ms"].numel() == 1
        ck["sha256"] = payload_digest({k: v for k, v in ck.items() if k != "sha256"})
        torch.save(ck, path)
    assert TrainConfig.load(str(exp / "config.json")).plasticity_per_unit is False
    capsys.readouterr()
    rc = main(["eval", "--experiments-dir", str(root), "--experiment-name", "pair",
               "--num-eval-episodes", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert main(["resume", "--experiments-dir", str(root), "--experiment-name", "pair",
                 "--num-episodes", "30"]) == 0


def test_per_unit_plasticity_is_the_default(trained):
    ck = torch.load(trained / "checkpoints" / "final_model.pt", map_location="cpu", weights_only=True)
    assert ck["config"]["plasticity_per_unit"] is True and ck["spec"]["plasticity_per_unit"] is True
    assert ck["learner"]["online"]["core.eta_per_100ms"].shape == (16,)
