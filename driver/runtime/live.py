"""Live control of a running distributed job: scaling actors, heartbeat, telemetry hooks.

:class:`LiveControlMixin` gives :class:`driver.runtime.distributed.DistributedTrainer`:

* **scaling** (``python main.py scale --experiment-name X --num-actors N``): the CLI writes
  ``experiments/X/control.json`` atomically (``{"num_actors": N, "request_id": ...}``); the
  driver polls it about once a second.  Scaling up starts actors with the current weights
  (:meth:`add_actor`); scaling down takes the newest actors out of rotation
  (:meth:`remove_actor`): no new chunk is given, the one in flight is collected and counted,
  the actor ships any trial messages it still holds (``ActorWorker.drain``) and is then
  killed.  The learner and the replay server are not touched, so nothing in replay is lost.
  A count the cluster cannot place (not enough free CPUs for the new actors) or below 1 is
  refused.  Either way the driver answers in ``experiments/X/control_result.json``
  (``status`` applied/refused, ``reason``) and in its log.
* **heartbeat and telemetry** (:mod:`driver.observe.telemetry`): ``heartbeat.json`` about once a
  second, TensorBoard scalars and Prometheus gauges with every metrics record, and each
  actor's node id in the records (``actor_nodes``, ``num_nodes``).

The mixin only adds methods; the driver loop calls ``_live_start`` once the roles run,
``_live_tick`` every turn and ``_live_record`` / ``telemetry.log`` around each metrics record;
the loop closes the telemetry at the end.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from mpn_dqn.driver.observe.telemetry import (Telemetry, heartbeat_alive, read_heartbeat, read_json,
                                              write_json_atomic)
from mpn_dqn.driver.runtime.ray_cluster import kill_quietly

CONTROL_FILE = "control.json"
CONTROL_RESULT_FILE = "control_result.json"
CONTROL_POLL_S = 1.0
HEARTBEAT_S = 1.0
DRAIN_TIMEOUT_S = 10.0       # an actor being removed gets this long to ship what it holds


class ScaleError(Exception):
    """The scale request cannot be sent (no such experiment, not running, not scalable)."""


class LiveControlMixin:
    """Scaling, heartbeat and telemetry for DistributedTrainer (see the module docstring).
    Expects the trainer's attributes: cfg, exp, log, counters, actors, inflight, weights,
    target_episodes, and its methods add_actor(), _on_chunk(i, summary) and
    _record_acked(i, summary)."""

    # -- set-up / tear-down ----------------------------------------------------------------------
    def _live_start(self) -> None:
        self.telemetry = Telemetry(self.exp.dir, runtime="ray", experiment=self.exp.name,
                                   prometheus=True)
        self._control_path = self.exp.dir / CONTROL_FILE
        self._control_result_path = self.exp.dir / CONTROL_RESULT_FILE
        old = read_json(self._control_path)              # a request left from an earlier run
        self._control_seen = old.get("request_id") if old else None
        self._control_mtime = self._mtime(self._control_path)
        self._next_control = 0.0
        self._next_beat = 0.0
        self._draining: dict[int, dict] = {}             # actor index -> {"ref", "stage", "since"}
        self._node_refs: dict[int, tuple] = {}           # actor index -> (handle, ref of node_id())
        self.actor_nodes: dict[int, str] = {}            # actor index -> node id
        self.scale_events: list[dict] = []
        self._wait_actors_placed()
        self._live_tick()

    def _wait_actors_placed(self, timeout: float = 120.0) -> None:
        """Wait until every actor runs (its process is up on some node), so that the records
        show where each one runs from the first on; log the placement."""
        import ray
        refs = {}
        for i, a in enumerate(self.actors):
            if a is not None:
                ref = a.node_id.remote()
                self._node_refs[i] = (a, ref)
                refs[ref] = i
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                self.actor_nodes[refs[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - died while starting: recovery replaces it
                pass
        where = " ".join(f"{i}@{self.actor_nodes[i][:8]}" for i in sorted(self.actor_nodes))
        nodes = len(set(self.actor_nodes.values()))
        missing = len(refs) - len(self.actor_nodes)
        self.log(f"Actors placed on {nodes} node(s): {where}"
                 + (f"; {missing} not running after {timeout:.0f}s" if missing else ""))

    # -- every loop turn -------------------------------------------------------------------------
    def _live_tick(self) -> None:
        now = time.time()
        self._track_nodes()
        if self._draining:
            self._advance_draining()
        if now >= self._next_control:
            self._next_control = now + CONTROL_POLL_S
            self._poll_control()
        if now >= self._next_beat and not self.telemetry.closed:
            self._next_beat = now + HEARTBEAT_S
            self.telemetry.heartbeat("running", episode=self.counters.episodes,
                                     target_episodes=self.target_episodes,
                                     num_actors=self.active_actor_count())

    def active_actor_count(self) -> int:
        return sum(1 for i, a in enumerate(self.actors) if a is not None and i not in self._draining)

    # -- metrics ---------------------------------------------------------------------------------
    def _live_record(self, rec: dict) -> dict:
        """Add where each actor runs to a metrics record (before it is written)."""
        self._track_nodes()
        nodes = [self.actor_nodes.get(i) if a is not None else None for i, a in enumerate(self.actors)]
        rec["actor_nodes"] = nodes
        rec["num_nodes"] = len({n for n in nodes if n})
        return rec

    def _track_nodes(self) -> None:
        import ray
        for i, a in enumerate(self.actors):
            if a is None:
                continue
            held = self._node_refs.get(i)
            if held is None or held[0] is not a:         # new (or restarted) actor: ask once
                self._node_refs[i] = (a, a.node_id.remote())
                self.actor_nodes.pop(i, None)
        pending = {ref: i for i, (a, ref) in self._node_refs.items()
                   if ref is not None and i not in self.actor_nodes}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            i = pending[ref]
            try:
                self.actor_nodes[i] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a dead actor: asked again when replaced
                self.log(f"Actor {i}: node id unknown ({type(exc).__name__}: {exc})")
                self._node_refs[i] = (self._node_refs[i][0], None)

    # -- scaling ---------------------------------------------------------------------------------
    @staticmethod
    def _mtime(path: Path) -> float | None:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    def _poll_control(self) -> None:
        m = self._mtime(self._control_path)
        if m is None or m == self._control_mtime:
            return
        self._control_mtime = m
        req = read_json(self._control_path)
        if not req or req.get("request_id") in (None, self._control_seen):
            return
        self._control_seen = req["request_id"]
        self.scale_to(req.get("num_actors"), request_id=req["request_id"])

    def scale_to(self, n, request_id: str | None = None) -> dict:
        """Add or remove actors so that ``n`` are active; answer in control_result.json."""
        import ray
        before = self.active_actor_count()
        result = {"request_id": request_id, "num_actors_before": before, "num_actors": before,
                  "time": time.time(), "episode": self.counters.episodes}
        reason = None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            reason = f"num_actors must be a whole number >= 1, got {n!r}"
        elif n > before:
            need = n - before
            from mpn_dqn.driver.runtime.ray_cluster import current_placement_group
            pg = current_placement_group()
            if pg is not None:
                slots = sum(1 for b in pg.bundle_specs if b.get("CPU", 0) >= 1) - 1   # minus the learner's
                if n > slots:
                    reason = (f"this run is a sweep trial whose placement group holds {slots} actor(s); "
                              "it cannot grow")
            free = ray.available_resources().get("CPU", 0.0)
            total = ray.cluster_resources().get("CPU", 0.0)
            if reason is None and pg is None and free < need:
                reason = (f"{need} more actor(s) need {need} CPU(s) but the cluster has "
                          f"{free:g} free of {total:g}; add nodes or ask for fewer")
        if reason is not None:
            result.update(status="refused", reason=reason)
            self.log(f"Scale request {request_id}: refused ({reason})")
        else:
            if n > before:
                for _ in range(n - before):
                    self.add_actor()
            elif n < before:
                active = [i for i, a in enumerate(self.actors) if a is not None and i not in self._draining]
                for i in sorted(active, reverse=True)[:before - n]:
                    self.remove_actor(i)
            result.update(status="applied", num_actors=n,
                          reason="no change" if n == before else None)
            self.log(f"Scale request {request_id}: {before} -> {n} actors at episode "
                     f"{self.counters.episodes}")
        self.scale_events.append(result)
        try:
            write_json_atomic(self._control_result_path, result)
        except OSError as exc:
            self.log(f"Scale result not written: {exc}")
        return result

    def remove_actor(self, i: int) -> None:
        """Stop giving actor ``i`` work; it is killed once its chunk in flight is back and its
        pending trial messages are shipped (see :meth:`_advance_draining`)."""
        ref = next((r for r, j in self.inflight.items() if j == i), None)
        if ref is not None:
            self.inflight.pop(ref)
        self._draining[i] = {"ref": ref, "stage": "chunk", "since": time.time()}

    def _advance_draining(self) -> None:
        import msgpack
        import ray
        for i, d in list(self._draining.items()):
            actor = self.actors[i]
            ref = d["ref"]
            if ref is not None:
                ready, _ = ray.wait([ref], timeout=0)
                timed_out = time.time() - d["since"] > DRAIN_TIMEOUT_S
                if not ready and not timed_out:
                    continue
                if ready and d["stage"] == "chunk":
                    try:
                        summary = msgpack.unpackb(ray.get(ref), raw=False)
                    except Exception:  # noqa: BLE001 - the actor died meanwhile
                        summary = None
                    if summary is not None:
                        self._on_chunk(i, summary)         # its trials and episodes count
                        self._record_acked(i, summary)     # RecoveryMixin's ledger
                        if summary.get("pending") and hasattr(actor, "drain"):
                            d.update(ref=actor.drain.remote(DRAIN_TIMEOUT_S / 2), stage="drain",
                                     since=time.time())
                            continue
            kill_quietly(actor)
            self.actors[i] = None
            del self._draining[i]
            self.log(f"Actor {i} removed ({self.active_actor_count()} actors now)")


# -- the `scale` command's side ------------------------------------------------------------------
def check_scalable(exp_dir: str | os.PathLike, stale_s: float = 30.0) -> dict:
    """The heartbeat of a running distributed job, or :class:`ScaleError` saying why not."""
    hb = read_heartbeat(exp_dir)
    alive, why = heartbeat_alive(hb, stale_s=stale_s)
    if not alive:
        raise ScaleError(f"experiment {Path(exp_dir).name!r} is not running ({why})")
    if hb.get("runtime") != "ray":
        raise ScaleError(f"experiment {Path(exp_dir).name!r} runs in a single process "
                         "(--num-actors 0); only a Ray run can be scaled")
    return hb


def send_scale_request(exp_dir: str | os.PathLike, num_actors: int) -> str:
    """Write control.json atomically; returns the request id."""
    request_id = uuid.uuid4().hex[:12]
    write_json_atomic(Path(exp_dir) / CONTROL_FILE,
                      {"num_actors": int(num_actors), "request_id": request_id, "time": time.time(),
                       "from": f"{os.uname().nodename}:{os.getpid()}"})
    return request_id


def wait_scale_result(exp_dir: str | os.PathLike, request_id: str, wait_s: float) -> dict | None:
    """The driver's answer to ``request_id`` (control_result.json), or None after ``wait_s``."""
    path = Path(exp_dir) / CONTROL_RESULT_FILE
    deadline = time.time() + wait_s
    while True:
        res = read_json(path)
        if res and res.get("request_id") == request_id:
            return res
        if time.time() >= deadline:
            return None
        time.sleep(0.2)
