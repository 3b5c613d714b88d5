"""The learner role: a :class:`Learner` fed with batches sampled from a replay.

Plain class, free of any runtime: it is handed a :class:`common.roles.ReplayClient` to sample
from and a weights ``store`` to publish with (``driver/runtime/ray_roles.py`` gives Ray ones;
:mod:`common.roles` in-process ones).  Two ways to drive it: :meth:`start` runs a prefetch
thread that keeps a small queue of sampled batches and a training thread that consumes it (the
Ray placement; ``status`` answers meanwhile); :meth:`train_available` trains in the caller's
thread for as long as the replay's rate limiter allows (the single-process placement).
Weights are published every ``publish_period`` updates as msgpack bytes, one ``store`` per
version.
"""
from __future__ import annotations

import io
import queue
import threading
import time

import msgpack
import torch

from mpn_dqn.common.codec import encode_params
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.common.networks import NetSpec
from mpn_dqn.common.roles import ReplayClient, ReplayUnavailable, WeightsStore, local_store
from mpn_dqn.learner.diagnostics import replay_staleness
from mpn_dqn.learner.learner import Learner


class LearnerWorker:
    def __init__(self, cfg: dict, spec: dict, replay: ReplayClient | list, checkpoint: bytes | None = None,
                 publish_period: int = 10, prefetch: int = 2, version_floor: int = 0,
                 store: WeightsStore = local_store):
        torch.set_num_threads(1)
        self.cfg = TrainConfig.from_dict(cfg)
        self.spec = NetSpec(**spec)
        # one replay, or several (shards): a prefetch thread samples whole batches from each
        self.replays = list(replay) if isinstance(replay, (list, tuple)) else [replay]
        self.store = store
        self.learner = Learner.from_config(self.spec, self.cfg)
        if checkpoint is not None:
            ck = torch.load(io.BytesIO(checkpoint), map_location=self.learner.device, weights_only=True)
            self.learner.load_state_dict(ck)
        # a learner restarted from a checkpoint publishes versions above every one already
        # out there (actors take weights only when their version is newer than their own)
        self.learner.version = max(self.learner.version, int(version_floor))
        self.replay_errors = 0
        self.publish_period = publish_period
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()            # guards the reporting fields
        self.update_lock = threading.Lock()     # held while the weights change
        self.latest: list | None = None
        self.idle_s = 0.0
        self.busy_s = 0.0
        self.trial_steps = 0
        self.recent: list[dict] = []
        self.staleness: list[dict] = []         # --staleness-every: R2D2's replay-state staleness
        self.error: str | None = None
        self.threads: list[threading.Thread] = []
        self._publish()

    # -- weights -----------------------------------------------------------------------------
    def _publish(self) -> None:
        params, version = self.learner.publish()
        handle = self.store(encode_params(params, version))          # one store per version
        with self.lock:
            self.latest = [version, handle]

    def latest_weights(self) -> list | None:
        """``[version, handle]`` of the newest published weights."""
        with self.lock:
            return self.latest

    # -- threads -----------------------------------------------------------------------------
    def start(self) -> bool:
        if self.threads:
            return True
        targets = [(self._prefetch_loop, (k,)) for k in range(len(self.replays))]
        for target, args in targets + [(self._train_loop, ())]:
            t = threading.Thread(target=target, args=args, daemon=True)
            t.start()
            self.threads.append(t)
        return True

    def pid(self) -> int:
        import os
        return os.getpid()

    @property
    def replay(self) -> ReplayClient:
        return self.replays[0]

    def set_replay(self, replay: ReplayClient, shard: int = 0) -> bool:
        """Sample from this replay server (shard ``shard``) from now on (the driver restarted it)."""
        self.replays[shard] = replay
        return True

    def _prefetch_loop(self, shard: int = 0) -> None:
        B = self.cfg.trial_batch_size
        try:
            while not self.stop_flag.is_set():
                try:
                    batch = self.replays[shard].sample(B)
                except ReplayUnavailable:
                    # the replay server died (or hung): wait for the driver to hand over a
                    # restarted one (set_replay) and go on with it
                    self.replay_errors += 1
                    self.stop_flag.wait(0.1)
                    continue
                if batch is None:                             # rate limiter: wait for actors
                    time.sleep(0.002)
                    continue
                while not self.stop_flag.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as exc:  # noqa: BLE001 - reported through status()
            self.error = f"prefetch: {type(exc).__name__}: {exc}"

    def _train_loop(self) -> None:
        try:
            while not self.stop_flag.is_set():
                t0 = time.time()
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    self.idle_s += time.time() - t0
                    continue
                self.idle_s += time.time() - t0
                self._train_on(item)
        except Exception as exc:  # noqa: BLE001
            self.error = f"train: {type(exc).__name__}: {exc}"

    def _train_on(self, batch) -> None:
        """One update; on a GPU the batch's host->device copy happens here, synchronously
        (measured faster than staging it from the prefetch thread on a copy stream)."""
        t1 = time.time()
        steps = int(batch.lengths.sum())
        with self.update_lock:
            stats = self.learner.update(batch)
        self.busy_s += time.time() - t1
        with self.lock:
            self.trial_steps += steps
            if self.learner.updates % 5 == 0:
                self.recent.append({k: float(v) for k, v in stats.items()})
                self.recent = self.recent[-200:]
        every = self.cfg.staleness_every
        if every and self.cfg.replay_init != "burn-in" and self.learner.updates % every == 0:
            st = replay_staleness(self.learner.online, self.replay.episode_prefixes(8),
                                  self.cfg.replay_init)
            if st:
                with self.lock:
                    self.staleness = (self.staleness + [st])[-200:]
        if self.learner.updates % self.publish_period == 0:
            with self.update_lock:
                self._publish()

    def train_available(self, max_updates: int | None = None) -> int:
        """Train in this thread on batches sampled now, until the replay's rate limiter says
        wait (or ``max_updates``); returns the number of updates.  Raises ReplayUnavailable."""
        n = 0
        B = self.cfg.trial_batch_size
        while max_updates is None or n < max_updates:
            batch = self.replay.sample(B)
            if batch is None:
                break
            self._train_on(batch)
            n += 1
        return n

    def stop(self) -> bool:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=5)
        return True

    # -- reporting -----------------------------------------------------------------------------
    def status(self) -> bytes:
        """msgpack: updates, version, trial_steps, idle/busy seconds, recent loss stats."""
        with self.lock:
            recent, self.recent = self.recent, []
            staleness, self.staleness = self.staleness, []
            out = {"updates": self.learner.updates, "version": self.learner.version,
                   "trial_steps": self.trial_steps, "idle_s": self.idle_s, "busy_s": self.busy_s,
                   "recent": recent, "staleness": staleness, "error": self.error, "device": str(self.learner.device),
                   "replay_errors": self.replay_errors,
                   **self.learner.plasticity()}
        return msgpack.packb(out, use_bin_type=True)

    def checkpoint_bytes(self) -> bytes:
        """The learner's state dict as torch.save bytes (loaded with weights_only=True)."""
        with self.update_lock:
            buf = io.BytesIO()
            torch.save(self.learner.state_dict(), buf)
        return buf.getvalue()
