"""The roles of a training job and what they talk to.

Three roles and one helper shape every training run:

* an **actor** (:class:`actors.worker.ActorWorker`) runs env steps with given weights and ships
  completed trials to a replay, as msgpack messages with a (source, seq) key;
* a **replay** (:class:`replay.server.ReplayServer`) inserts those messages exactly once,
  samples batches under a samples-per-insert rate limit, and snapshots / restores its state;
* a **learner** (:class:`learner.worker.LearnerWorker`) consumes batches that it samples from a
  replay and is the source of versioned weights;
* every role with state that outlives a process is **saveable** (checkpoint bytes or a replay
  snapshot).

The roles never talk to a runtime directly.  What they are handed at construction decides
where they run: a :class:`ReplayClient` (the replay as its users see it), a weights
``store`` (publishes weight bytes, returns a handle that actors can fetch) and a weights
``fetch`` (a handle back to bytes).  :class:`LocalReplay` and :func:`local_store` /
:func:`local_fetch` put everything in one process; ``driver/runtime/ray_roles.py`` gives the same
interfaces over Ray.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol


class ReplayUnavailable(RuntimeError):
    """The replay server cannot be reached (dead, restarting or hung).  The caller keeps what
    it wanted to send and retries once it is handed a replay again."""


class WeightsUnavailable(RuntimeError):
    """Published weights are gone (their publisher died); newer ones will be handed over."""


class ReplayClient(Protocol):
    """A replay as the actor and the learner use it."""

    def insert(self, payload: bytes, source: str, seq: int) -> dict:
        """Store one msgpack trial message; returns the server's acknowledgement
        (``status`` ok / retry / rejected, ``accepted``, ``epoch``).  Raises ReplayUnavailable."""

    def sample(self, batch_size: int) -> Any:
        """One training batch, or None while the rate limiter holds the learner back.
        Raises ReplayUnavailable."""

    def episode_prefixes(self, n: int) -> list:
        """Up to ``n`` (trial, preceding trials of its episode) pairs, for diagnostics."""


WeightsStore = Callable[[bytes], Any]      # msgpack weight bytes -> a handle actors can fetch
WeightsFetch = Callable[[Any], bytes]      # a handle -> msgpack weight bytes (WeightsUnavailable)


class LocalReplay:
    """A :class:`ReplayClient` on a replay server in the same process: direct calls."""

    def __init__(self, server):
        self.server = server

    def insert(self, payload: bytes, source: str, seq: int) -> dict:
        return self.server.insert(payload, source, seq)

    def sample(self, batch_size: int):
        return self.server.sample(batch_size)

    def episode_prefixes(self, n: int) -> list:
        return self.server.episode_prefixes(n)


def local_store(data: bytes) -> bytes:
    """In one process a published version is its bytes."""
    return data


def local_fetch(handle: bytes) -> bytes:
    return handle
