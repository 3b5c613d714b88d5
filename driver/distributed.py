"""The distributed runtime on Ray: the driver that wires actors, replay server and learner.

The roles are the plain classes of ``actors/``, ``replay/`` and ``learner/``; this module only
wraps them with ``ray.remote`` and moves msgpack bytes between them:

    actors --(trials, msgpack)--> replay server --(batches, msgpack)--> learner
    learner --(weights, msgpack, one ray.put per version)--> actors (via the driver's calls)
    actors/learner --(summaries/status, msgpack)--> driver --> metrics.jsonl, progress, checkpoints

With no ``--address`` (and no RAY_ADDRESS) an embedded local Ray is started on 127.0.0.1
(dashboard on 127.0.0.1 only) and shut down at the end; otherwise the driver joins the
cluster and leaves it running.
"""
from __future__ import annotations

import io
import logging
import os
import time
from types import SimpleNamespace

import msgpack
import torch

from common.config import TrainConfig
from common.networks import NetSpec
from driver.experiment import Experiment, load_checkpoint
from driver.local import Stop, build_spec, checkpoint_payload, finish_run
from driver.progress import Counters, ProgressBar, ReportWindow, epsilon_at, make_record, progress_line
from learner.learner import Learner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_PERIOD_S = 0.5


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured (e.g. not enough CPUs for the actors)."""


def init_ray(cfg: TrainConfig, log=print) -> bool:
    """Start an embedded Ray or join ``--address``/RAY_ADDRESS.  Returns True if started here."""
    import ray
    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)     # keep Ray's start-up chatter off the progress
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}}
    common = dict(logging_level=logging.WARNING, log_to_driver=False, runtime_env=env)
    if address:
        log(f"Joining Ray cluster at {address}")
        ray.init(address=address, **common)
    else:
        ncpu = max(os.cpu_count() or 1, cfg.num_actors + 1)
        ray.init(num_cpus=ncpu, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                 include_dashboard=False, **common)
    return True


def _remote_classes(learner_gpus: float):
    import ray
    from actors.worker import ActorWorker
    from learner.worker import LearnerWorker
    from replay.server import ReplayServer
    replay_cls = ray.remote(num_cpus=0, max_concurrency=16)(ReplayServer)
    learner_cls = ray.remote(num_cpus=1, num_gpus=learner_gpus, max_concurrency=4)(LearnerWorker)
    actor_cls = ray.remote(num_cpus=1)(ActorWorker)
    return replay_cls, learner_cls, actor_cls


def _learner_gpus(cfg: TrainConfig) -> float:
    import ray
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda":
        if gpus < 1:
            raise ClusterError("--device cuda but the Ray cluster has no GPU; use --device cpu or auto")
        return 1
    if cfg.device == "auto" and gpus >= 1:
        return 1
    return 0


def check_capacity(num_actors: int, learner_cpus: int = 1) -> None:
    import ray
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < num_actors + learner_cpus:
        raise ClusterError(f"{num_actors} actors + the learner need {num_actors + learner_cpus} CPUs "
                           f"but the Ray cluster has {cpus:g}; use fewer --num-actors or add nodes")


def train_distributed(cfg: TrainConfig, exp: Experiment, *, resume_from: str | None = None,
                      target_episodes: int | None = None, log=print) -> dict:
    import ray
    torch.set_num_threads(1)
    started = init_ray(cfg, log)
    try:
        return _run(cfg, exp, resume_from, target_episodes or cfg.num_episodes, log)
    finally:
        if started:
            ray.shutdown()


def _run(cfg: TrainConfig, exp: Experiment, resume_from, target_episodes: int, log) -> dict:
    import ray
    spec = build_spec(cfg)
    check_capacity(cfg.num_actors)
    replay_cls, learner_cls, actor_cls = _remote_classes(_learner_gpus(cfg))
    counters = Counters()
    ck_bytes = None
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        counters = Counters.from_dict(ck["counters"])
        buf = io.BytesIO()
        torch.save(ck["learner"], buf)
        ck_bytes = buf.getvalue()
        log(f"Resumed from {resume_from}: episode {counters.episodes}, {counters.updates} updates")
    cfg_d, spec_d = cfg.to_dict(), spec.to_dict()
    burn = cfg.burn_in_steps if cfg.replay_init == "burn-in" else 0
    schema = {"obs_dim": spec.obs_dim, "state_size": spec.state_size, "num_actions": spec.num_actions,
              "max_burnin": max(burn, 0)}
    replay = replay_cls.remote(cfg.buffer_size, schema, samples_per_insert=cfg.replay_ratio,
                               min_size=cfg.learning_starts, batch_size=cfg.trial_batch_size,
                               max_burnin=burn, seed=cfg.seed + counters.episodes)
    learner = learner_cls.remote(cfg_d, spec_d, replay, ck_bytes)
    weights = ray.get(learner.latest_weights.remote())
    params_msg = ray.get(weights[1][0])
    seed_offset = 7919 * counters.episodes
    actors = [actor_cls.options(scheduling_strategy="SPREAD").remote(
        cfg_d, spec_d, i, cfg.num_actors, replay, params_msg, seed_offset) for i in range(cfg.num_actors)]
    ray.get(learner.start.remote())
    steps0 = counters.trial_steps_trained
    inflight = {a.run_chunk.remote(counters.env_steps, weights): i for i, a in enumerate(actors)}
    win = ReportWindow()
    next_report = (counters.episodes // cfg.print_freq + 1) * cfg.print_freq
    next_ckpt = (counters.episodes // cfg.checkpoint_freq + 1) * cfg.checkpoint_freq
    bar = ProgressBar(target_episodes, counters.episodes)
    t_start = time.time()
    wall0 = counters.wall_time
    last = {"t": t_start, "env": counters.env_steps, "upd": counters.updates,
            "train": counters.trial_steps_trained, "idle": 0.0}
    deadline = t_start + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    status = {"version": weights[0], "updates": counters.updates, "trial_steps": 0, "idle_s": 0.0}
    rstats = {"size": 0}
    last_status = 0.0
    interrupted = False
    actor_versions = [weights[0]] * cfg.num_actors
    eps = cfg.epsilon_start

    def save(name: str) -> None:
        counters.wall_time = wall0 + time.time() - t_start
        sd = torch.load(io.BytesIO(ray.get(learner.checkpoint_bytes.remote())), map_location="cpu", weights_only=True)
        exp.save_checkpoint({"format": 1, "learner": sd, "spec": spec_d, "config": cfg_d,
                             "counters": counters.to_dict()}, name)

    with Stop() as stop:
        while counters.episodes < target_episodes:
            if stop.requested or (deadline is not None and time.time() > deadline):
                interrupted = stop.requested
                if not stop.requested:
                    log(f"Time limit of {cfg.time_limit_minutes} min reached.")
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=STATUS_PERIOD_S)
            for ref in ready:
                i = inflight.pop(ref)
                s = msgpack.unpackb(ray.get(ref), raw=False)
                counters.env_steps += s["env_steps"]
                counters.trials += len(s["trials"])
                win.add_trial_summaries(s["trials"], status["version"])
                win.add_episodes([SimpleNamespace(steps=e[0], reward=e[1]) for e in s["episodes"]])
                counters.episodes += len(s["episodes"])
                actor_versions[i] = s["weights_version"]
                eps = epsilon_at(counters.env_steps, cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps)
                inflight[actors[i].run_chunk.remote(counters.env_steps, weights)] = i
            now = time.time()
            report_due = counters.episodes >= next_report or counters.episodes >= target_episodes
            if report_due or now - last_status > STATUS_PERIOD_S:
                last_status = now
                status = msgpack.unpackb(ray.get(learner.status.remote()), raw=False)
                if status.get("error"):
                    raise RuntimeError(f"learner failed: {status['error']}")
                weights = ray.get(learner.latest_weights.remote())
                rstats = ray.get(replay.stats.remote())
                counters.updates = status["updates"]          # the learner's count (resumed ones included)
                counters.trial_steps_trained = steps0 + status["trial_steps"]
                for r in status["recent"]:
                    win.add_learner_stats(r)
            bar.update(counters.episodes)
            if counters.episodes >= next_report or counters.episodes >= target_episodes:
                next_report = (counters.episodes // cfg.print_freq + 1) * cfg.print_freq
                now = time.time()
                dtime = max(1e-9, now - last["t"])
                counters.wall_time = wall0 + now - t_start
                idle = status.get("idle_s", 0.0)
                rec = make_record(
                    win, counters, env_name=cfg.env_name, dt=cfg.dt, epsilon=eps,
                    weights_version=status["version"], elapsed=counters.wall_time,
                    rate_env=(counters.env_steps - last["env"]) / dtime,
                    rate_upd=(counters.updates - last["upd"]) / dtime,
                    rate_train=(counters.trial_steps_trained - last["train"]) / dtime,
                    replay_size=rstats["size"], num_actors=cfg.num_actors,
                    extra={"learner_idle_frac": min(1.0, (idle - last["idle"]) / dtime),
                           "samples_per_insert": rstats.get("samples_per_insert"),
                           "replay_rejected": rstats.get("rejected", 0),
                           "actor_weights_versions": list(actor_versions),
                           **{k: status[k] for k in ("eta", "lambda") if k in status}})
                last = {"t": now, "env": counters.env_steps, "upd": counters.updates,
                        "train": counters.trial_steps_trained, "idle": idle}
                exp.append_metrics(rec)
                bar.clear()
                log(progress_line(rec, target_episodes))
                if rec["accuracy"] is not None and rec["accuracy"] > counters.best_accuracy and counters.updates > 0:
                    counters.best_accuracy = rec["accuracy"]
                    save("best_model.pt")
                win = ReportWindow()
            if counters.episodes >= next_ckpt:
                next_ckpt = (counters.episodes // cfg.checkpoint_freq + 1) * cfg.checkpoint_freq
                save(f"checkpoint_{counters.episodes}.pt")
    bar.clear()
    # drain: let in-flight chunks finish (their trials are already in replay), then stop roles
    ray.wait(list(inflight), num_returns=len(inflight), timeout=10)
    ray.get(learner.stop.remote())
    status = msgpack.unpackb(ray.get(learner.status.remote()), raw=False)
    counters.updates = status["updates"]
    counters.wall_time = wall0 + time.time() - t_start
    sd = torch.load(io.BytesIO(ray.get(learner.checkpoint_bytes.remote())), map_location="cpu", weights_only=True)
    local = Learner.from_config(spec, TrainConfig.from_dict({**cfg_d, "device": "cpu"}))
    local.load_state_dict(sd)
    for a in actors:
        ray.kill(a)
    ray.kill(learner)
    ray.kill(replay)
    return finish_run(exp, cfg, spec, local, counters, interrupted, log=log)
