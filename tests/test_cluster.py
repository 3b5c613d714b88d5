"""Cluster launch, live scaling and live metrics (issue 6).

* the deploy files parse and carry what `ray up` and KubeRay need;
* TensorBoard event files and the heartbeat of a single-process run; `watch --once`;
* a running Ray job scaled 1 -> 2 -> 1 actors through `main.py scale` without losing replay
  contents, trials or learner progress; a count the cluster cannot place is refused;
  Prometheus metrics registered; TensorBoard scalars of the distributed runtime;
* a real two-node cluster on 127.0.0.1 from deploy/local_cluster.sh, a training submitted
  with `ray job submit`, actors on both nodes, and `stop` stopping only that cluster;
* a `sweep` on that cluster (`--address`): a trial's placement group spreads its actors over
  both nodes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.cli.parser import main
from mpn_dqn.driver.experiment import Experiment

ROOT = Path(__file__).resolve().parent.parent
PDM = "PerceptualDecisionMaking-v0"


def _cfg(tmp_path, **kw):
    base = dict(env_name=PDM, num_actors=1, envs_per_actor=4, num_episodes=100_000, hidden_dim=16,
                trial_batch_size=8, learning_starts=16, buffer_size=100_000, print_freq=4,
                checkpoint_freq=100_000, eval_trials=0, experiments_dir=str(tmp_path),
                experiment_name="live")
    base.update(kw)
    return TrainConfig(**base)


def _scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- deploy files --------------------------------------------------------------------------------

def test_cluster_yaml_has_what_ray_up_needs():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, t in types.items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(t), name
        assert t["node_config"]["InstanceType"]
        assert t["min_workers"] <= t["max_workers"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) >= 1                     # the learner's node
    actors = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert actors and all(t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] >= 1
                          for t in actors)
    assert 1 <= sum(t["max_workers"] for t in actors) <= cfg["max_workers"]
    # torch is installed before the project, the CPU wheel on the actor nodes
    for key, want in (("head_setup_commands", None), ("worker_setup_commands", "whl/cpu")):
        cmds = cfg[key]
        t = next(i for i, c in enumerate(cmds) if "torch" in c)
        p = next(i for i, c in enumerate(cmds) if "pip install -e" in c)
        assert t < p, key
        if want:
            assert want in cmds[t]
    assert cfg["setup_commands"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    # Ray's own schema check (offline: fills in defaults, validates against ray-schema.json)
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(cfg))


def test_kuberay_rayjob_has_what_kuberay_needs():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert re.search(r"python \S*main\.py train-neurogym\b", spec["entrypoint"])
    rc = spec["rayClusterSpec"]
    head = rc["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    hc = head["template"]["spec"]["containers"]
    assert hc and all(c["image"] and c["name"] for c in hc)
    assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in hc)
    workers = rc["workerGroupSpecs"]
    assert workers
    for g in workers:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        wc = g["template"]["spec"]["containers"]
        assert wc and all(c["image"] and c["name"] for c in wc)


# -- single process: TensorBoard, heartbeat, watch -----------------------------------------------

def test_local_run_writes_tensorboard_and_heartbeat(tmp_path, capsys):
    from mpn_dqn.driver.runtime.local import train_local
    cfg = _cfg(tmp_path, num_actors=0, num_episodes=8, print_freq=2, experiment_name="tb-local")
    exp = Experiment(tmp_path, cfg.experiment_name)
    exp.create(cfg)
    train_local(cfg, exp, log=lambda *_: None)
    recs = exp.read_metrics()
    scalars = _scalars(exp.dir / "tensorboard")
    for tag in ("actors/accuracy", "actors/pct_of_ideal", "actors/reward_per_trial", "actors/epsilon",
                "actors/env_steps_per_s", "replay/size", "learner/weights_version",
                "actors/num_actors", "learner/eta", "learner/lambda"):
        assert tag in scalars, (tag, sorted(scalars))
        assert [s for s, _ in scalars[tag]] == [r["env_steps"] for r in recs]
    assert len(scalars["replay/size"]) == len(recs) >= 2
    hb = json.loads((exp.dir / "heartbeat.json").read_text())
    assert hb["status"] == "finished" and hb["runtime"] == "local" and hb["pid"] == os.getpid()

    capsys.readouterr()
    assert main(["watch", "--experiment-name", "tb-local", "--experiments-dir", str(tmp_path),
                 "--once"]) == 0
    out = capsys.readouterr().out
    assert "NOT RUNNING: finished" in out and "accuracy" in out and "replay size" in out
    assert any(ch in out for ch in "▁▂▃▄▅▆▇█")
    # scaling a single-process (or finished) run is refused with exit 2
    assert main(["scale", "--experiment-name", "tb-local", "--experiments-dir", str(tmp_path),
                 "--num-actors", "2"]) == 2
    assert "not running" in capsys.readouterr().err


# -- a running Ray job: scale 1 -> 2 -> 1, telemetry ---------------------------------------------

def _scrape(port: int, needle: str) -> str | None:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return text if needle in text else None


def _wait(pred, timeout, what, step=0.2):
    t_end = time.time() + timeout
    while time.time() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.ray
@pytest.mark.slow
def test_scale_a_running_job_up_and_down(ray_session, tmp_path, capsys):
    from mpn_dqn.driver.runtime.distributed import DistributedTrainer
    cfg = _cfg(tmp_path, num_actors=1)
    exp = Experiment(tmp_path, cfg.experiment_name)
    exp.create(cfg)
    lines: list[str] = []
    trainer = DistributedTrainer(cfg, exp, resume_from=None, target_episodes=cfg.num_episodes,
                                 log=lines.append)
    out: dict = {}

    def run():
        try:
            out["summary"] = trainer.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    args = ["--experiment-name", "live", "--experiments-dir", str(tmp_path)]

    def recs():
        return exp.read_metrics()

    def n_after(k):
        return lambda: len(recs()) >= k and recs()

    try:
        _wait(lambda: (exp.dir / "heartbeat.json").exists() and len(recs()) >= 3, 120, "first records")
        assert main(["watch", *args, "--once"]) == 0
        assert "ALIVE" in capsys.readouterr().out
        # more actors than the cluster has free CPUs: refused, nothing changes
        assert main(["scale", *args, "--num-actors", "64"]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "CPU" in err
        res = json.loads((exp.dir / "control_result.json").read_text())
        assert res["status"] == "refused" and res["num_actors"] == 1

        k_up = len(recs())
        assert main(["scale", *args, "--num-actors", "2"]) == 0
        assert "1 -> 2" in capsys.readouterr().out
        _wait(lambda: [r for r in recs()[k_up:] if r["num_actors"] == 2 and all(r["actor_nodes"])][2:],
              120, "three records with 2 actors")
        k_down = len(recs())
        assert main(["scale", *args, "--num-actors", "1"]) == 0
        _wait(lambda: [r for r in recs()[k_down:] if r["num_actors"] == 1][2:], 120,
              "three records with 1 actor after scaling down")
        assert trainer.active_actor_count() == 1
        # Ray exports the driver's gauges on its node's metrics port (Prometheus text format)
        port = ray_session._private.worker._global_node.metrics_export_port
        prom = _wait(lambda: _scrape(port, "ray_mpn_dqn_num_actors{"), 60, "Prometheus export", step=2)
    finally:
        trainer.target_episodes = 0          # ends the driver loop at its next turn
        th.join(timeout=120)
    assert not th.is_alive(), "the driver did not stop"
    assert "error" not in out, out.get("error")

    rs = recs()
    counts = [r["num_actors"] for r in rs]
    assert counts[0] == 1 and 2 in counts and counts[-1] == 1
    # nothing lost: replay only grows, trials and learner updates keep increasing
    sizes = [r["replay_size"] for r in rs]
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), sizes
    trials = [r["trials"] for r in rs]
    assert all(b > a for a, b in zip(trials, trials[1:])), trials
    ups = [r["updates"] for r in rs]
    assert all(b >= a for a, b in zip(ups, ups[1:])) and ups[-1] > ups[counts.index(2)]
    i2 = counts.index(2)
    i1 = i2 + counts[i2:].index(1)
    assert ups[i1] > ups[i2] and ups[-1] > ups[i1]          # the learner went on throughout
    assert trainer.counters.trials >= trials[-1]
    assert all(r.get("replay_rejected", 0) == 0 for r in rs)
    ev = [e for e in trainer.scale_events if e["status"] == "applied"]
    assert [(e["num_actors_before"], e["num_actors"]) for e in ev] == [(1, 2), (2, 1)]
    assert any("Actor 1 removed" in line for line in lines)
    hb = json.loads((exp.dir / "heartbeat.json").read_text())
    assert hb["status"] == "finished" and hb["runtime"] == "ray"

    # Prometheus: the key series as ray.util.metrics Gauges/Counters, tagged by role
    names = trainer.telemetry.prometheus_names()
    for key in ("loss", "q_mean", "q_max", "td_abs", "accuracy", "pct_ideal", "reward_per_trial",
                "epsilon", "env_steps_per_s", "trial_steps_trained_per_s", "replay_size",
                "samples_per_insert", "policy_lag", "weights_version", "num_actors",
                "env_steps_total", "trials_total", "updates_total"):
        assert "mpn_dqn_" + key in names, key
    assert all(m.info["tag_keys"] == ("role", "experiment") for m in trainer.telemetry.gauges.values())
    for name, role in (("num_actors", "driver"), ("replay_size", "replay"), ("env_steps_per_s", "actor"),
                       ("weights_version", "learner"), ("updates_total", "learner")):
        assert re.search(rf'^ray_mpn_dqn_{name}{{[^}}]*experiment="live"[^}}]*role="{role}"', prom, re.M), name

    # TensorBoard: one point per metrics record, step = env steps
    scalars = _scalars(exp.dir / "tensorboard")
    steps = [r["env_steps"] for r in rs]
    for tag in ("learner/loss", "learner/q_mean", "learner/q_max", "learner/td_error_abs",
                "actors/accuracy", "actors/epsilon", "actors/env_steps_per_s",
                "learner/trial_steps_trained_per_s", "replay/size", "replay/samples_per_insert",
                "learner/weights_version", "actors/num_actors"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [s for s, _ in scalars["actors/num_actors"]] == steps
    assert [v for _, v in scalars["actors/num_actors"]] == [float(c) for c in counts]


# -- a real two-node cluster on 127.0.0.1, `ray job submit` ---------------------------------------

GCS, DASH, BASE, WBASE = 6490, 8370, 6500, 21000          # not the script's defaults


def _cluster_env(state: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(MPN_CLUSTER_DIR=state, MPN_CLUSTER_GCS_PORT=str(GCS), MPN_CLUSTER_DASHBOARD_PORT=str(DASH),
               MPN_CLUSTER_PORT_BASE=str(BASE), MPN_CLUSTER_WORKER_PORT_BASE=str(WBASE),
               PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    return env


def _script(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "deploy" / "local_cluster.sh"), *cmd], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def loopback_cluster():
    state = tempfile.mkdtemp(prefix="mpnc", dir="/tmp")        # short: Ray's socket paths
    env = _cluster_env(state)
    try:
        p = _script(["start", "--workers", "1", "--head-cpus", "2", "--worker-cpus", "1"], env, 180)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        client = dict(env)
        for line in _script(["env"], env, 30).stdout.splitlines():
            m = re.match(r"export (\w+)=(.*)", line)
            if m:
                client[m.group(1)] = m.group(2)
        yield state, env, client
    finally:
        sids = [f.read_text().strip() for f in Path(state, "nodes").glob("*.sid")]
        p = _script(["stop"], env, 120)
        ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True)
        alive = [ln for ln in ps.stdout.splitlines()         # (zombies: dead, not yet reaped)
                 if len(ln.split()) > 2 and ln.split()[1] in sids and not ln.split()[2].startswith("Z")]
        shutil.rmtree(state, ignore_errors=True)
        assert p.returncode == 0, p.stderr
        assert not alive, f"cluster processes left after stop: {alive}"


@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_to_a_two_node_loopback_cluster(loopback_cluster, ray_session, tmp_path):
    state, env, client = loopback_cluster
    st = _script(["status"], env, 90)
    assert st.returncode == 0, st.stdout + st.stderr
    cluster_nodes = set(re.findall(r"node_([0-9a-f]{56})", st.stdout))
    assert len(cluster_nodes) == 2, st.stdout
    # every node registered on loopback
    assert "127.0.0.1" in Path(state, "nodes", "head.log").read_text()

    cmd = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{DASH}", "--working-dir", str(ROOT),
           "--", "python", "main.py", "train-neurogym", "--env-name", PDM, "--num-actors", "2",
           "--envs-per-actor", "4", "--num-episodes", "24", "--hidden-dim", "16",
           "--trial-batch-size", "8", "--learning-starts", "16", "--print-freq", "8",
           "--eval-trials", "0", "--experiments-dir", str(tmp_path), "--experiment-name", "job"]
    p = subprocess.run(cmd, cwd=ROOT, env=client, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "succeeded" in p.stdout + p.stderr, p.stdout[-4000:] + p.stderr[-2000:]
    recs = Experiment(tmp_path, "job").read_metrics()
    assert recs and recs[-1]["episode"] >= 24 and recs[-1]["updates"] > 0
    nodes = {n for r in recs for n in r["actor_nodes"] if n}
    assert nodes == cluster_nodes, (nodes, cluster_nodes)     # actors ran on both nodes
    assert recs[-1]["num_nodes"] == 2
    hb = json.loads((tmp_path / "job" / "heartbeat.json").read_text())
    assert hb["status"] == "finished" and hb["runtime"] == "ray"
    # the test session's own Ray is another instance, untouched by the cluster (and its stop)
    assert ray_session.get(ray_session.put(7)) == 7


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_the_two_node_loopback_cluster(loopback_cluster, tmp_path):
    state, env, client = loopback_cluster
    cmd = [sys.executable, "main.py", "sweep", "--env-name", PDM, "--seeds", "0", "--address", f"127.0.0.1:{GCS}",
           "--sweeps-dir", str(tmp_path), "--sweep-name", "c", "--", "--num-actors", "2", "--envs-per-actor", "4",
           "--num-episodes", "24", "--hidden-dim", "16", "--trial-batch-size", "8", "--learning-starts", "16",
           "--print-freq", "8", "--eval-trials", "20"]
    p = subprocess.run(cmd, cwd=ROOT, env=client, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "on 3 CPUs" in p.stdout and "1/1 done" in p.stdout, p.stdout
    exp = Experiment(tmp_path / "c" / "experiments", "PerceptualDecisionMaking-mpn-s0")
    recs = exp.read_metrics()
    assert recs and recs[-1]["updates"] > 0 and recs[-1]["num_nodes"] == 2
    assert len({n for r in recs for n in r["actor_nodes"] if n}) == 2        # the bundles spread
    rows = json.loads((tmp_path / "c" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"]
