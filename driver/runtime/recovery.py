"""Fault tolerance: roles that die are restarted and training goes on; replay snapshots.

:class:`RecoveryMixin` gives :class:`driver.runtime.distributed.DistributedTrainer` its recovery:

* **an actor dies** (its process is killed, its node goes away): the driver's ``ray.get`` of
  its chunk raises ``RayActorError``; a fresh actor takes the same index with the current
  weights and the current replay handle (``actor_restarts``).  What the dead actor had
  collected but not yet had acknowledged is lost with it — whole trials only: the replay server
  stores a message entirely or not at all.
* **the replay server dies**: a call to it raises ``RayActorError``; a new server is started
  and restored from the newest snapshot, the learner and every actor are handed the new handle
  (``set_replay``), and the actors retry the messages they had no acknowledgement for.  Each
  message carries (sender, sequence number) and the server remembers, in the snapshot too,
  the last one it stored per sender, so a retry is never stored twice.  ``replay_trials_lost``
  counts the trials the dead server had acknowledged beyond its snapshot:
  ``(restored count of that server + trials it acknowledged) - restored count of the next``.
* **the learner dies**: a new learner starts from the newest checkpoint bytes the driver saved
  (``learner_restarts``), publishing weight versions above any the actors hold.

Snapshots (``--replay-snapshot-every N``): every N trials and with every periodic checkpoint
the driver asks the server for :meth:`ReplayServer.snapshot` bytes and writes them atomically
to ``checkpoints/replay_snapshot.npz`` (see :mod:`replay.snapshot`); ``resume`` restores the
replay server from it and writes ``resume.json`` (``driver/runtime/loop.py``, for both placements).
"""
from __future__ import annotations

import time
from pathlib import Path

from mpn_dqn.driver.experiment import CheckpointError, Experiment
from mpn_dqn.driver.runtime.ray_cluster import actor_scheduling, epsilon_spread, kill_quietly
from mpn_dqn.replay.snapshot import SnapshotError, read_snapshot_file

SNAPSHOT_NAME = "replay_snapshot.npz"
_COUNTER_KEYS = ("episodes", "env_steps", "trials", "updates", "trial_steps_trained")
MAX_CONSECUTIVE_CHUNK_ERRORS = 3
MAX_RESTARTS_IN_WINDOW = 5          # an actor index that dies more often than this ...
RESTART_WINDOW_S = 60.0             # ... within this many seconds stops the run


def snapshot_path(exp: Experiment, shard: int = 0) -> Path:
    """Replay server ``shard``'s snapshot file (``replay_snapshot.npz``, then
    ``replay_snapshot.1.npz`` ... with ``--replay-shards``)."""
    name = SNAPSHOT_NAME if shard == 0 else SNAPSHOT_NAME.replace(".npz", f".{shard}.npz")
    return exp.checkpoint_dir / name


def load_resume_snapshot(exp: Experiment, shard: int = 0) -> tuple[Path, bytes, dict] | None:
    """Replay server ``shard``'s snapshot, verified, or None if it has none.  A damaged one
    raises :class:`CheckpointError` naming the file (the CLI exits 2)."""
    path = snapshot_path(exp, shard)
    if not path.exists():
        return None
    try:
        data, arrays = read_snapshot_file(path)
    except SnapshotError as exc:
        raise CheckpointError(str(exc)) from None
    return path, data, arrays


def snapshot_info(arrays: dict) -> dict:
    """Size, cumulative inserts/samples and the recorded counters of an unpacked snapshot."""
    return {"size": int(arrays["buf_size"]), "inserted": int(arrays["limiter_inserts"]),
            "samples": int(arrays["limiter_samples"]),
            "extra": {k[6:]: arrays[k].item() for k in arrays if k.startswith("extra_")}}


def counter_extra(counters) -> dict:
    return {k: int(getattr(counters, k)) for k in _COUNTER_KEYS}


class RecoveryMixin:
    """Restart logic for DistributedTrainer (see the module docstring).  Expects the trainer's
    attributes: cfg, exp, log, counters, spec, shards, snap_paths, actors, inflight,
    actor_versions, weights, replays, learner, ck_bytes, replay_cls, learner_cls, actor_cls,
    cfg_d, spec_d."""

    # -- set-up ----------------------------------------------------------------------------------
    def _init_recovery(self) -> None:
        self.actor_restarts = 0
        self.replay_restarts = 0
        self.learner_restarts = 0
        self.fault_hooks: list = []              # callables(trainer), run each loop turn (tests)
        self.incarnation: dict[int, int] = {}    # actor index -> restarts of that index
        self.acked: dict[tuple, dict] = {}       # (index, incarnation) -> {epoch: trials acked}
        # every replay-server incarnation of every shard has its own epoch number (the epoch its
        # acknowledgements name); shard k starts as epoch k
        self.next_epoch = self.shards
        self.shard_epoch = list(range(self.shards))
        self.epoch_start: dict[int, int] = {k: 0 for k in range(self.shards)}  # epoch -> inserted at start
        self.epoch_restored: dict[int, int] = {}     # dead epoch -> what its successor restored
        self.restores: list[dict] = []
        self.chunk_errors: dict[int, int] = {}
        self.restart_times: dict[int, list[float]] = {}
        self.ck_counters = self.counters.to_dict()
        self._learner_bytes = None

    def _note(self, msg: str) -> None:
        bar = getattr(self, "bar", None)
        if bar is not None:
            bar.clear()
        self.log(msg)

    def _new_replay(self, shard: int):
        from mpn_dqn.replay.server import ReplayServer
        epoch = self.shard_epoch[shard]
        return self.replay_cls.remote(
            **ReplayServer.config_kwargs(self.cfg, self.spec),
            seed=self.cfg.seed + self.counters.episodes + 1_000 * epoch, epoch=epoch)

    def _replay_restore(self, data: bytes, where: str, shard: int = 0) -> dict:
        import ray
        try:
            return ray.get(self.replays[shard].restore.remote(data, where))
        except ray.exceptions.RayTaskError as exc:     # it does not fit this configuration
            raise CheckpointError(str(exc.cause if hasattr(exc, "cause") else exc)) from None

    def replay_restored(self, info: dict, shard: int = 0) -> None:
        self.epoch_start[self.shard_epoch[shard]] = info["inserted"]
        self.restores.append(info)

    # -- calls that survive a dead role ------------------------------------------------------------
    def _learner_get(self, name: str, *args, timeout: float = 120.0):
        return self._call_role("learner", self._restart_learner, name, *args, timeout=timeout)

    def _replay_get(self, name: str, *args, timeout: float = 120.0):
        """The call on every replay server (restarting dead ones); ``stats`` merged, any
        other call's answer from the only server (see :meth:`_replay_snapshots`)."""
        from mpn_dqn.replay.server import ReplayServer
        out = [self._call_role(lambda k=k: self.replays[k], lambda k=k: self._restart_replay(k), name,
                               *args, timeout=timeout, what="replay server")
               for k in range(len(self.replays))]
        if name == "stats":
            return ReplayServer.merge_stats(out)
        if len(out) != 1:
            raise ValueError(f"{name} on {len(out)} replay servers: call it per server")
        return out[0]

    def _replay_snapshots(self, extra: dict) -> list[bytes]:
        return [self._call_role(lambda k=k: self.replays[k], lambda k=k: self._restart_replay(k),
                                "snapshot", extra, timeout=120.0, what="replay server")
                for k in range(len(self.replays))]

    def _call_role(self, role, restart, name: str, *args, timeout: float, what: str | None = None):
        """``ray.get(<role>.<name>(*args))``, restarting the role (up to 3 times) if it died.
        ``role``: an attribute name of the trainer, or a callable returning the handle."""
        import ray
        from ray.exceptions import RayActorError
        for _ in range(3):
            handle = role() if callable(role) else getattr(self, role)
            try:
                return ray.get(getattr(handle, name).remote(*args), timeout=timeout)
            except RayActorError:
                restart()
        raise RuntimeError(f"the {what or role} died three times in a row; giving up")

    def _learner_checkpoint_bytes(self) -> bytes:
        self._learner_bytes = self._learner_get("checkpoint_bytes")
        return self._learner_bytes

    def _params_msg(self) -> bytes:
        """The current weights' msgpack bytes (refreshing them if their owner died)."""
        import ray
        from ray.exceptions import GetTimeoutError, ObjectLostError
        for _ in range(3):
            try:
                return ray.get(self.weights[1][0], timeout=60)
            except (ObjectLostError, GetTimeoutError):
                self.weights = self._learner_get("latest_weights")
        raise RuntimeError("cannot fetch the current weights")

    # -- actors --------------------------------------------------------------------------------------
    def _collect_chunk(self, i: int, ref) -> dict | None:
        """The chunk's summary, or None if the actor died (it is replaced and given work)."""
        import msgpack
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        try:
            raw = ray.get(ref)
        except RayTaskError as exc:             # the actor lives, its chunk failed
            n = self.chunk_errors[i] = self.chunk_errors.get(i, 0) + 1
            if n >= MAX_CONSECUTIVE_CHUNK_ERRORS:
                raise RuntimeError(f"actor {i} failed {n} chunks in a row: {exc}") from exc
            self._note(f"Actor {i}: chunk failed ({type(exc).__name__}); retrying")
            self._submit(i)
            return None
        except RayActorError:
            self._replace_actor(i)
            return None
        self.chunk_errors[i] = 0
        summary = msgpack.unpackb(raw, raw=False)
        self._record_acked(i, summary)
        if summary.get("replay_down"):           # an actor could not reach it: restart it if dead
            self._replay_get("stats", timeout=30)
        return summary

    def _record_acked(self, i: int, summary: dict) -> None:
        """Actor ``i``'s acknowledged trials per replay epoch (for :meth:`replay_trials_lost`)."""
        self.acked[(i, self.incarnation.get(i, 0))] = {int(e): int(n)
                                                        for e, n in summary.get("acked", [])}

    def _submit(self, i: int) -> None:
        spread = epsilon_spread(self.actors, getattr(self, "_draining", {})).get(i)
        self.inflight[self.actors[i].run_chunk.remote(self.counters.env_steps, self.weights,
                                                      spread=spread)] = i

    def _replace_actor(self, i: int) -> None:
        kill_quietly(self.actors[i])
        now = time.time()
        recent = [t for t in self.restart_times.get(i, []) if now - t < RESTART_WINDOW_S] + [now]
        self.restart_times[i] = recent
        if len(recent) > MAX_RESTARTS_IN_WINDOW:
            raise RuntimeError(f"actor {i} died {len(recent)} times within {RESTART_WINDOW_S:.0f} s; "
                               "giving up (see the Ray worker logs for why)")
        self.actor_restarts += 1
        inc = self.incarnation[i] = self.incarnation.get(i, 0) + 1
        params_msg = self._params_msg()
        self.actors[i] = self.actor_cls.options(scheduling_strategy=actor_scheduling()).remote(
            self.cfg_d, self.spec_d, i, max(1, self.cfg.effective_num_actors),
            self.replays[i % len(self.replays)], params_msg,
            7919 * self.counters.episodes + 104_729 * i + 15_485_863 * inc)
        self.actor_versions[i] = self.weights[0]
        self._submit(i)
        self._note(f"Actor {i} died; started a new one with weights version {self.weights[0]} "
                   f"(actor restarts: {self.actor_restarts})")

    # -- replay server ---------------------------------------------------------------------------
    def _restart_replay(self, shard: int = 0) -> None:
        import ray
        dead = self.shard_epoch[shard]
        kill_quietly(self.replays[shard])
        self.shard_epoch[shard], self.next_epoch = self.next_epoch, self.next_epoch + 1
        self.replays[shard] = handle = self._new_replay(shard)
        path = self.snap_paths[shard]
        info = None
        if path.exists():
            try:
                data, _ = read_snapshot_file(path)
                info = ray.get(handle.restore.remote(data, str(path)))
                self.restores.append(info)
            except (SnapshotError, ray.exceptions.RayTaskError) as exc:
                self._note(f"Replay snapshot unusable ({exc}); the new replay server starts empty")
        restored = info["inserted"] if info else 0
        self.epoch_start[self.shard_epoch[shard]] = restored
        self.epoch_restored[dead] = restored
        self.replay_restarts += 1
        try:
            ray.get(self.learner.set_replay.remote(handle, shard), timeout=30)
        except Exception:  # noqa: BLE001 - a dead learner gets the new handle when restarted
            pass
        for i, a in enumerate(self.actors):
            if a is not None and i % len(self.replays) == shard:
                a.set_replay.remote(handle)          # runs before the actor's next chunk
        which = f"Replay server {shard}" if len(self.replays) > 1 else "Replay server"
        self._note(f"{which} died; restarted it from "
                   f"{'its snapshot (' + str(info['size']) + ' trials)' if info else 'nothing (empty)'}"
                   f" (replay restarts: {self.replay_restarts})")

    def replay_trials_lost(self) -> int:
        lost = 0
        for e, restored_next in self.epoch_restored.items():
            acked = sum(d.get(e, 0) for d in self.acked.values())
            lost += max(0, self.epoch_start[e] + acked - restored_next)
        return lost

    # -- learner ---------------------------------------------------------------------------------
    def _restart_learner(self) -> None:
        import ray
        kill_quietly(self.learner)
        floor = max([int(self.weights[0]), *[int(v) for v in self.actor_versions]])
        self.learner = self.learner_cls.remote(self.cfg_d, self.spec_d, list(self.replays), self.ck_bytes,
                                               version_floor=floor)
        ray.get(self.learner.start.remote())
        self.weights = ray.get(self.learner.latest_weights.remote())
        self.learner_restarts += 1
        # the new learner counts from the checkpoint: so do the driver's rates
        self.steps0 = int(self.ck_counters.get("trial_steps_trained", 0))
        last = getattr(self, "last", None)
        if last is not None:
            last.update(upd=int(self.ck_counters.get("updates", 0)), train=self.steps0, idle=0.0)
        self._note(f"Learner died; restarted it from "
                   f"{'the last checkpoint' if self.ck_bytes else 'scratch (no checkpoint yet)'}"
                   f" at update {self.ck_counters.get('updates', 0)} (learner restarts: "
                   f"{self.learner_restarts})")

    # -- hooks into the driver loop ----------------------------------------------------------------
    def after_save(self, name: str) -> None:
        """A checkpoint was written: it is now what a restarted learner starts from."""
        if self._learner_bytes is not None:
            self.ck_bytes = self._learner_bytes
            self.ck_counters = self.counters.to_dict()
        super().after_save(name)

    def _run_fault_hooks(self) -> None:
        for hook in list(self.fault_hooks):
            hook(self)

    def fault_metrics(self) -> dict:
        return {**super().fault_metrics(), "actor_restarts": self.actor_restarts,
                "replay_restarts": self.replay_restarts, "learner_restarts": self.learner_restarts,
                "replay_trials_lost": self.replay_trials_lost()}


def write_resume_json(exp: Experiment, checkpoint: str, counters: dict, snapshot: Path | None,
                      info: dict | None, replay_now: dict) -> None:
    exp.write_json("resume.json", {
        "time": time.time(), "checkpoint": str(checkpoint), "counters": counters,
        "replay_snapshot": str(snapshot) if snapshot else None,
        "snapshot": info, "replay": replay_now})


__all__ = ["RecoveryMixin", "counter_extra", "load_resume_snapshot", "snapshot_info",
           "snapshot_path", "write_resume_json", "SNAPSHOT_NAME"]
