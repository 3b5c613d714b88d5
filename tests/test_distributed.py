"""The real Ray program: actors, replay server and learner as Ray actors on a real NeuroGym env."""
import json
import os

import pytest

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.experiment import Experiment, load_checkpoint

pytestmark = pytest.mark.ray


def _cfg(tmp_path, **kw):
    base = dict(env_name="PerceptualDecisionMaking-v0", num_actors=2, envs_per_actor=4, num_episodes=48,
                hidden_dim=16, trial_batch_size=8, learning_starts=16, buffer_size=200, print_freq=8,
                checkpoint_freq=24, eval_trials=50, experiments_dir=str(tmp_path), experiment_name="ray-run")
    base.update(kw)
    return TrainConfig(**base)


def test_two_actors_train_through_replay_and_learner(ray_session, tmp_path):
    from mpn_dqn.driver.runtime.distributed import train_distributed
    cfg = _cfg(tmp_path)
    exp = Experiment(tmp_path, cfg.experiment_name)
    exp.create(cfg)
    lines = []
    summary = train_distributed(cfg, exp, log=lines.append)
    recs = exp.read_metrics()
    assert recs, "metrics.jsonl must have records"
    last = recs[-1]
    assert last["episode"] >= 48 and last["num_actors"] == 2
    assert last["trials"] >= 48 * 10 * 0.9                       # trials arrived from both actors
    assert last["updates"] > 0 and last["weights_version"] > 1   # the learner trained and published
    assert max(max(r["actor_weights_versions"]) for r in recs) > 1   # new weights reached actors
    assert all(r["replay_rejected"] == 0 for r in recs)
    cpu = [r["actor_cpu_s"] for r in recs]                       # actors' own CPU time, cumulative
    assert cpu == sorted(cpu) and 0 < cpu[-1] < 2 * last["wall_time"] + 1
    assert any(r["replay_size"] > 0 for r in recs)
    assert summary["updates"] >= last["updates"]                 # the last record is not the end
    assert (exp.checkpoint_dir / "final_model.pt").exists()
    ck = load_checkpoint(exp.checkpoint_dir / "final_model.pt")
    assert ck["counters"]["episodes"] >= 48
    ev = summary["final_eval"]                                    # a fraction of whole trials
    assert ev["trials"] >= cfg.eval_trials and abs(ev["accuracy"] * ev["trials"] - round(ev["accuracy"] * ev["trials"])) < 1e-6
    assert any(line.startswith("Ep ") for line in lines)
    # the session is still ours (the driver must not shut down a Ray it did not start)
    assert ray_session.is_initialized()
    # one loop, two placements: the single-process runtime writes records with the same keys
    from mpn_dqn.driver.runtime.local import train_local
    local_cfg = _cfg(tmp_path, num_actors=0, num_episodes=16, eval_trials=0, experiment_name="local-run")
    local_exp = Experiment(tmp_path, local_cfg.experiment_name)
    local_exp.create(local_cfg)
    train_local(local_cfg, local_exp, log=lambda *a: None)
    assert {k for r in local_exp.read_metrics() for k in r} == {k for r in recs for k in r}


def test_epsilon_spread_follows_the_active_actors_after_scale():
    from mpn_dqn.common.exploration import actor_epsilon
    from mpn_dqn.driver.runtime.ray_cluster import epsilon_spread
    one = epsilon_spread(["a"], {})
    assert one == {0: (0, 1)}
    four = epsilon_spread(["a", "b", "c", "d"], {})                 # scaled 1 -> 4
    eps = [actor_epsilon(0.4, *four[i]) for i in range(4)]
    assert eps[0] == pytest.approx(0.4) and eps[3] == pytest.approx(0.4 ** 2)
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4  # the whole spread, not base ε
    # actor 1 died (None) and actor 3 is draining: the two that run span the spread
    assert epsilon_spread(["a", None, "c", "d"], {3: {}}) == {0: (0, 2), 2: (1, 2)}


def test_more_actors_than_the_machine_holds_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys,
                                                                                   monkeypatch):
    """The embedded Ray gets this machine's CPUs, not the request: --num-actors 64 is refused with
    the numbers before Ray starts or a directory is written."""
    import ray
    from mpn_dqn.driver.cli.parser import main
    monkeypatch.setattr(ray, "is_initialized", lambda: False)     # as in a fresh process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "64",
               "--experiments-dir", str(tmp_path / "exps"), "--experiment-name", "many"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"--num-actors 64 needs 65 CPUs (one per actor and one for the learner) but this machine " \
           f"has {os.cpu_count()}" in err, err
    assert not (tmp_path / "exps").exists()


def test_more_actors_than_a_joined_cluster_holds_is_one_line_exit_2_and_writes_nothing(ray_session, tmp_path,
                                                                                     capsys):
    """On a cluster (here the test session's Ray, already joined) the count is checked against the
    cluster's CPUs, still before anything is written."""
    from mpn_dqn.driver.cli.parser import main
    rc = main(["train-neurogym", "--env-name", "PerceptualDecisionMaking-v0", "--num-actors", "64",
               "--experiments-dir", str(tmp_path / "exps"), "--experiment-name", "many"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert "64 actors + the learner need 65 CPUs but the Ray cluster has" in err, err
    assert not (tmp_path / "exps").exists()


def test_the_embedded_rays_auth_token_is_made_readable_by_its_owner_only(tmp_path, monkeypatch):
    """Ray writes ~/.ray/auth_token with mode 0644; after the embedded Ray starts it is 0600."""
    from mpn_dqn.driver.runtime.ray_cluster import _private_token
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("t" * 64)
    token.chmod(0o644)
    _private_token()
    assert token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)


def test_two_replay_shards_train_snapshot_each_and_resume_from_both(ray_session, tmp_path):
    """--replay-shards 2: each actor feeds its own server, the learner samples both, every
    snapshot writes one file per server, and a resumed run restores each from its own file."""
    from mpn_dqn.driver.runtime.distributed import train_distributed
    from mpn_dqn.driver.runtime.recovery import snapshot_info, snapshot_path
    from mpn_dqn.replay.snapshot import read_snapshot_file
    cfg = _cfg(tmp_path, replay_shards=2, replay_snapshot_every=40, eval_trials=0, experiment_name="shards")
    exp = Experiment(tmp_path, cfg.experiment_name)
    exp.create(cfg)
    lines = []
    first = train_distributed(cfg, exp, log=lines.append)
    assert any(line.startswith("2 replay servers, learner and 2 actor(s)") for line in lines)
    infos = [snapshot_info(read_snapshot_file(snapshot_path(exp, k))[1]) for k in range(2)]
    assert all(i["inserted"] > 0 and i["samples"] > 0 for i in infos)      # both fed and sampled
    recs = exp.read_metrics()
    assert recs[-1]["replay_size"] == sum(i["size"] for i in infos)        # stats merged over both
    lines = []
    train_distributed(cfg, exp, resume_from=str(exp.latest_checkpoint()),
                      target_episodes=first["episodes"] + 24, log=lines.append)
    for k, name in enumerate(("replay_snapshot.npz", "replay_snapshot.1.npz")):
        assert any(line.startswith(f"Replay restored from {name}: {infos[k]['size']} trials") for line in lines)
    resume = json.loads((exp.dir / "resume.json").read_text())
    assert resume["snapshot"]["size"] == sum(i["size"] for i in infos)
    assert exp.read_metrics()[-1]["episode"] >= first["episodes"] + 24
