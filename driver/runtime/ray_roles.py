"""The roles on Ray: each role class wrapped in ``ray.remote``, and Ray versions of what the
roles are handed (:mod:`common.roles`).  The only place where a role meets Ray.

* :class:`RayReplayClient`: a replay-server actor handle as a :class:`common.roles.ReplayClient`
  (``ray.get`` with a timeout; a dead or hung server raises ``ReplayUnavailable``).  Sampled
  batches arrive in shared memory when the replay server runs on the caller's node (the
  server writes them into the caller's :class:`replay.wire.SharedSlots`; nothing is copied
  or encoded on the way), else as arrays through Ray's object store, checked on arrival.
* :func:`ray_store` / :func:`ray_fetch`: weights published with one ``ray.put`` per version,
  the ref wrapped in a list so that Ray passes it along unresolved.
* :class:`RayActorWorker`, :class:`RayLearnerWorker`: the roles constructed with those, taking
  replay actor handles (also in ``set_replay``), plus what only Ray has (the node id).
"""
from __future__ import annotations

from mpn_dqn.actors.worker import ActorWorker
from mpn_dqn.common.networks import NetSpec
from mpn_dqn.common.roles import ReplayUnavailable, WeightsUnavailable
from mpn_dqn.learner.worker import LearnerWorker
from mpn_dqn.replay.server import ReplayServer
from mpn_dqn.replay.buffer import TrialBatch
from mpn_dqn.replay.wire import SharedSlots, batch_layout, batch_views, check_batch

INSERT_TIMEOUT_S = 30.0
SAMPLE_TIMEOUT_S = 30.0
TRIALS_PER_REQUEST = 512        # shared memory: batches per sampling call = this / batch size
FETCH_TIMEOUT_S = 30.0


class RayReplayClient:
    def __init__(self, handle, obs_dim: int, state_size: int, held: int = 3):
        self.handle, self.obs_dim, self.state_size = handle, obs_dim, state_size
        self.held = held                # batches the caller may still be using when it asks again
        self.ready: list[TrialBatch] = []   # sampled by the last request, not handed out yet
        self.shared: SharedSlots | None = None
        self.retired: list[SharedSlots] = []
        self.use_shared = True

    def _get(self, ref, timeout: float):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
        try:
            return ray.get(ref, timeout=timeout)
        except (RayActorError, GetTimeoutError) as exc:
            raise ReplayUnavailable(str(exc)) from None

    def insert(self, payload: bytes, source: str, seq: int) -> dict:
        return self._get(self.handle.insert.remote(payload, source, seq), INSERT_TIMEOUT_S)

    def sample(self, batch_size: int):
        if self.use_shared:
            batch = self._sample_shared(batch_size)
            if batch is not False:
                return batch
        batch = self._get(self.handle.sample.remote(batch_size), SAMPLE_TIMEOUT_S)
        return None if batch is None else check_batch(batch, self.obs_dim, self.state_size)

    def _retire(self) -> None:
        if self.shared is not None:                  # batches in use keep their mapping
            self.shared.unlink()
            self.retired.append(self.shared)
            self.shared = None

    def _slots(self, nbytes: int, per_request: int) -> SharedSlots:
        if self.shared is None or self.shared.slot_bytes < nbytes:
            self._retire()
            self.shared = SharedSlots(self.held + per_request, nbytes)
        return self.shared

    def _sample_shared(self, B: int):
        """A batch in shared memory, None (rate limiter), or False: the server cannot reach
        this process's memory (another node), use the object store.  One call to the server
        fills up to ``TRIALS_PER_REQUEST / B`` slots; the batches are handed out one by one."""
        if self.ready:
            return self.ready.pop(0)
        k = max(1, TRIALS_PER_REQUEST // B)
        guess = batch_layout(B, 64, 0, self.obs_dim, self.state_size)[1]
        for _ in range(3):
            slots = self._slots(guess, k)
            offs = slots.peek(k)
            head = self._get(self.handle.sample_into.remote(B, slots.name, offs, slots.slot_bytes),
                             SAMPLE_TIMEOUT_S)
            if head is None:
                return None
            if head.get("no_segment"):
                if slots.opened:             # a restarted server: it needs a segment with a name
                    self._retire()
                    continue
                self.use_shared = False      # another node: the object store
                self.close()
                return False
            if "need" in head:
                guess = int(head["need"] * 1.25)
                continue
            if not slots.opened:             # the server has it mapped: drop the name, so that
                slots.unlink()               # nothing outlives the two processes
                slots.opened = True
            got = head["batches"]
            slots.advance(len(got))
            self.ready = [TrialBatch(**batch_views(slots.shm.buf, off, h["B"], h["T"], h["N"],
                                                   self.obs_dim, self.state_size))
                          for off, h in zip(offs, got)]
            return self.ready.pop(0)
        return False

    def close(self) -> None:
        for s in self.retired + ([self.shared] if self.shared else []):
            s.close()
        self.shared, self.retired = None, []

    def episode_prefixes(self, n: int) -> list:
        return self._get(self.handle.episode_prefixes.remote(n), SAMPLE_TIMEOUT_S)


def ray_store(data: bytes) -> list:
    import ray
    return [ray.put(data)]


def ray_fetch(handle: list) -> bytes:
    import ray
    from ray.exceptions import GetTimeoutError, ObjectLostError
    try:
        return ray.get(handle[0], timeout=FETCH_TIMEOUT_S)
    except (ObjectLostError, GetTimeoutError) as exc:
        raise WeightsUnavailable(str(exc)) from None


def _client(handle, spec: dict, held: int = 3) -> RayReplayClient:
    ns = NetSpec(**spec)
    return RayReplayClient(handle, ns.obs_dim, ns.state_size, held)


class RayActorWorker(ActorWorker):
    def __init__(self, cfg: dict, spec: dict, actor_id: int, num_actors: int, replay, params_msg: bytes,
                 seed_offset: int = 0):
        self._spec_d = spec
        super().__init__(cfg, spec, actor_id, num_actors, _client(replay, spec), params_msg,
                         seed_offset, fetch=ray_fetch)

    def set_replay(self, replay) -> bool:
        return super().set_replay(_client(replay, self._spec_d))

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()


class RayLearnerWorker(LearnerWorker):
    def __init__(self, cfg: dict, spec: dict, replay, checkpoint: bytes | None = None,
                 publish_period: int = 10, prefetch: int = 2, version_floor: int = 0):
        # batches of one shard in use when its prefetch thread asks again: the queue's (at most
        # its size) and the one in training
        self._spec_d, self._slots = spec, prefetch + 1
        handles = replay if isinstance(replay, (list, tuple)) else [replay]
        super().__init__(cfg, spec, [_client(h, spec, self._slots) for h in handles], checkpoint,
                         publish_period, prefetch, version_floor, store=ray_store)

    def set_replay(self, replay, shard: int = 0) -> bool:
        return super().set_replay(_client(replay, self._spec_d, self._slots), shard)


def remote_role_classes(learner_gpus: float) -> tuple:
    """(replay, learner, actor) as Ray actor classes: the replay threaded and CPU-free (it
    lives beside the driver), the learner threaded (``status`` answers while it trains) on
    one CPU (+ GPU), each actor on one CPU."""
    import ray
    return (ray.remote(num_cpus=0, max_concurrency=16)(ReplayServer),
            ray.remote(num_cpus=1, num_gpus=learner_gpus, max_concurrency=4)(RayLearnerWorker),
            ray.remote(num_cpus=1)(RayActorWorker))
