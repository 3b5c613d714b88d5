"""The replay server: a trial buffer behind a lock, a samples-per-insert rate limiter, and
strict decoding of everything that arrives.  A plain class, thread-safe: ``driver/runtime/ray_roles.py``
makes it a threaded Ray actor; the single-process placement calls it directly.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from mpn_dqn.common.codec import TrialDecodeError, TrialSchema, decode_trials
from mpn_dqn.replay.buffer import TrialBuffer
from mpn_dqn.replay.wire import AttachedSegments
from mpn_dqn.replay.snapshot import SnapshotError, pack_snapshot, rng_from_array, rng_to_array, unpack_snapshot


class RateLimiterError(ValueError):
    """Rate-limiter arguments that could deadlock or never sample; the message says why."""


class RateLimiter:
    """Keeps the learner's samples near ``samples_per_insert`` × inserted trials (Reverb's idea).

    Counted in trials.  Sampling a batch of n is allowed once ``min_size`` trials were
    inserted and while ``samples + n <= spi·inserts + error_buffer``; inserting is allowed while
    ``spi·inserts - samples <= error_buffer`` (the actors may run ahead of the learner by at most
    ``error_buffer / spi`` trials).  So the learner never replays the same trials endlessly and
    never waits for more than the slack it was given.

    Refused at construction (would deadlock or never sample): ``min_size`` > ``capacity``;
    ``error_buffer`` < ``batch_size`` (after a blocked sample the actors could also be blocked).
    """

    def __init__(self, samples_per_insert: float, min_size: int, error_buffer: float, *,
                 capacity: int, batch_size: int):
        if samples_per_insert <= 0:
            raise RateLimiterError(f"samples_per_insert must be > 0, got {samples_per_insert}")
        if min_size < 1:
            raise RateLimiterError(f"min_size must be >= 1, got {min_size}")
        if min_size > capacity:
            raise RateLimiterError(f"min_size_to_sample ({min_size}) exceeds the buffer capacity "
                                   f"({capacity}): the learner could never start; lower "
                                   "--learning-starts or raise --buffer-size")
        if error_buffer < batch_size:
            raise RateLimiterError(
                f"error_buffer ({error_buffer}) must be >= the batch size ({batch_size}): "
                "otherwise the learner and the actors can block each other forever")
        self.spi = float(samples_per_insert)
        self.min_size = int(min_size)
        self.error_buffer = float(error_buffer)
        self.inserts = 0
        self.samples = 0

    def can_sample(self, n: int) -> bool:
        return self.inserts >= self.min_size and self.samples + n <= self.spi * self.inserts + self.error_buffer

    def can_insert(self) -> bool:
        return self.inserts < self.min_size or self.spi * self.inserts - self.samples <= self.error_buffer

    def state(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples}


class ReplayServer:
    """Owns the trial buffer.  ``insert(payload)`` decodes and stores a msgpack trial batch;
    ``sample(n)`` returns a padded :class:`replay.buffer.TrialBatch` with the arrays the learner
    reads (handed over as they are: see :mod:`replay.wire`), or None when the rate limiter says
    wait.
    """

    def __init__(self, capacity: int, schema: dict, *, samples_per_insert: float, min_size: int,
                 batch_size: int, error_buffer: float | None = None, max_burnin: int = 0,
                 seed: int = 0, epoch: int = 0):
        self.schema = TrialSchema(**schema)
        self.epoch = int(epoch)                 # which incarnation of the server (restarts + 1)
        self.seen: dict[str, int] = {}          # source -> last sequence number inserted
        self.duplicates = 0
        self.restored: dict | None = None
        self.buffer = TrialBuffer(capacity, self.schema.obs_dim, self.schema.state_size,
                                  max_burnin=max_burnin, seed=seed)
        if error_buffer is None:
            error_buffer = max(2.0 * batch_size, 64.0 * samples_per_insert)
        self.limiter = RateLimiter(samples_per_insert, min_size, error_buffer, capacity=capacity,
                                   batch_size=batch_size)
        self.lock = threading.Lock()
        self.segments = AttachedSegments()      # learners' shared-memory batch slots
        self.rng = np.random.default_rng([seed, 99])
        self.diag_rng = np.random.default_rng([seed, 0x57A1E])    # diagnostics: not the sampling draws
        self.rejected = 0
        self.last_reject = ""
        self.insert_blocked = 0
        self.sample_blocked = 0
        self.bytes_in = 0
        self.t0 = time.time()

    @staticmethod
    def config_kwargs(cfg, spec) -> dict:
        """The constructor's arguments for a training config and network spec (all but
        ``seed`` and ``epoch``): one of ``cfg.replay_shards`` servers, each with an even share
        of the buffer and of the trials before learning starts."""
        burn = cfg.burn_in_steps if cfg.replay_init == "burn-in" else 0
        n = max(1, int(getattr(cfg, "replay_shards", 1)))
        return dict(capacity=cfg.buffer_size // n,
                    schema={"obs_dim": spec.obs_dim, "state_size": spec.state_size,
                            "num_actions": spec.num_actions, "max_burnin": burn},
                    samples_per_insert=cfg.replay_ratio, min_size=-(-cfg.learning_starts // n),
                    batch_size=cfg.trial_batch_size, max_burnin=burn)

    def insert(self, payload: bytes, source: str | None = None, seq: int | None = None) -> dict:
        """Returns {"status": "ok"|"retry"|"rejected", "accepted": n, "epoch": e}.  "retry":
        the rate limiter holds the actors back; send the same payload again later.

        A message is decoded whole before any of it is stored, so it is inserted entirely or
        not at all.  With ``source`` (a sender id, one per actor incarnation) and ``seq`` (its
        message number, increasing) a message already inserted is acknowledged again without
        being stored twice (``"duplicate": True``): a sender may retry whatever it has no
        acknowledgement for, e.g. after this server died and came back from a snapshot."""
        keyed = source is not None or seq is not None
        if keyed and not (type(source) is str and 0 < len(source) <= 64 and type(seq) is int
                          and 0 <= seq < 2 ** 62):
            return self._reject("insert: source must be a str of 1-64 chars and seq an int >= 0")
        with self.lock:
            if keyed and seq <= self.seen.get(source, -1):
                self.duplicates += 1
                return {"status": "ok", "accepted": 0, "duplicate": True, "epoch": self.epoch}
            if not self.limiter.can_insert():
                self.insert_blocked += 1
                return {"status": "retry", "accepted": 0, "epoch": self.epoch}
        try:
            trials = decode_trials(payload, self.schema)
        except TrialDecodeError as exc:
            return self._reject(str(exc))
        with self.lock:
            if keyed:
                if seq <= self.seen.get(source, -1):      # a concurrent retry got there first
                    self.duplicates += 1
                    return {"status": "ok", "accepted": 0, "duplicate": True, "epoch": self.epoch}
                self.seen[source] = seq
            self.buffer.add_many(trials)
            self.limiter.inserts += len(trials)
            self.bytes_in += len(payload)
        return {"status": "ok", "accepted": len(trials), "epoch": self.epoch}

    def _reject(self, reason: str) -> dict:
        with self.lock:
            self.rejected += 1
            self.last_reject = reason[:300]
        return {"status": "rejected", "accepted": 0, "reason": reason[:300], "epoch": self.epoch}

    def sample(self, batch_size: int, pad_multiple: int = 1):
        with self.lock:
            if not self.limiter.can_sample(batch_size):
                self.sample_blocked += 1
                return None
            batch = self.buffer.sample(batch_size, pad_multiple=pad_multiple, rng=self.rng,
                                       meta=False)
            self.limiter.samples += batch_size
        return batch

    def sample_into(self, batch_size: int, segment: str, offsets: list, nbytes: int,
                    pad_multiple: int = 1) -> dict | None:
        """:meth:`sample`, written into a caller's shared-memory segment (same node): one batch
        into each slot at ``offsets`` (``nbytes`` each; see :class:`replay.wire.SharedSlots`),
        in order, for as long as the rate limiter allows.  Returns ``{"batches": [{"B", "T",
        "N"}, ...]}`` (at least one); ``{"need": n}`` when the first batch does not fit a slot
        (nothing drawn); ``{"no_segment": True}`` when this process cannot open the segment
        (another node); None when the rate limiter says wait."""
        try:
            buf = self.segments.get(segment)
        except (FileNotFoundError, ValueError, OSError):
            return {"no_segment": True}
        heads = []
        with self.lock:
            for off in offsets:
                if not self.limiter.can_sample(batch_size):
                    break
                head = self.buffer.sample_into(batch_size, buf, off, nbytes, pad_multiple=pad_multiple,
                                               rng=self.rng)
                if "need" in head:
                    if not heads:
                        return head
                    break
                self.limiter.samples += batch_size
                heads.append(head)
            if not heads:
                self.sample_blocked += 1
                return None
        return {"batches": heads}

    def episode_prefixes(self, n: int) -> list:
        """Up to ``n`` stored trials with the stored trials of their episode before them (the
        learner's replay-staleness diagnostic), drawn with an RNG of their own."""
        with self.lock:
            return self.buffer.episode_prefixes(n, self.diag_rng)

    def stats(self) -> dict:
        with self.lock:
            ins = self.limiter.inserts
            return {"size": len(self.buffer), "inserted": ins, "sampled": self.limiter.samples,
                    "samples_per_insert": (self.limiter.samples / ins) if ins else 0.0,
                    "rejected": self.rejected, "last_reject": self.last_reject,
                    "insert_blocked": self.insert_blocked, "sample_blocked": self.sample_blocked,
                    "bytes_in": self.bytes_in, "nbytes": self.buffer.nbytes(),
                    "payload_nbytes": self.buffer.payload_nbytes(), "uptime_s": time.time() - self.t0,
                    "epoch": self.epoch, "duplicates": self.duplicates}

    @staticmethod
    def merge_stats(parts: list[dict]) -> dict:
        """:meth:`stats` of several servers (shards) as one: counts summed."""
        if len(parts) == 1:
            return parts[0]
        out = {k: sum(p[k] for p in parts) for k in ("size", "inserted", "sampled", "rejected",
               "insert_blocked", "sample_blocked", "bytes_in", "nbytes", "payload_nbytes", "duplicates")}
        out.update(samples_per_insert=out["sampled"] / out["inserted"] if out["inserted"] else 0.0,
                   last_reject=next((p["last_reject"] for p in parts if p["last_reject"]), ""),
                   uptime_s=min(p["uptime_s"] for p in parts), epoch=max(p["epoch"] for p in parts),
                   shards=len(parts))
        return out

    # -- fault tolerance -------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def snapshot(self, extra: dict | None = None) -> bytes:
        """The whole server state as checksummed ``.npz`` bytes (see :mod:`replay.snapshot`):
        the buffer, the rate limiter's counters, the sampling RNG, the de-duplication table,
        and ``extra`` (a dict of ints, e.g. the driver's counters, stored as ``extra_<key>``).
        Taken under the lock, so it is one consistent moment; written by the caller."""
        with self.lock:
            state = {"buf_" + k: v for k, v in self.buffer.state_dict().items()}
            state.update(limiter_inserts=self.limiter.inserts, limiter_samples=self.limiter.samples,
                         rejected=self.rejected, duplicates=self.duplicates,
                         rng_state=rng_to_array(self.rng), epoch=self.epoch,
                         seen_sources=np.array(sorted(self.seen), dtype="<U64"),
                         seen_seqs=np.array([self.seen[k] for k in sorted(self.seen)], np.int64),
                         time=time.time())
        for k, v in (extra or {}).items():
            state["extra_" + str(k)] = np.int64(v) if isinstance(v, (bool, int, np.integer)) \
                else np.float64(v)
        return pack_snapshot(state)

    def restore(self, data: bytes, where: str = "replay snapshot") -> dict:
        """Replace this server's state by a :meth:`snapshot`'s.  Raises :class:`SnapshotError`
        (nothing changed) if the bytes are damaged or the buffer configuration differs.
        Returns what was restored: size, inserted, samples, extra."""
        arrays = unpack_snapshot(data, where)
        buf_state = {k[4:]: v for k, v in arrays.items() if k.startswith("buf_")}
        fresh = TrialBuffer(self.buffer.capacity, self.buffer.obs_dim, self.buffer.state_size,
                            max_burnin=self.buffer.max_burnin)
        try:
            fresh.load_state_dict(buf_state)
            rng = rng_from_array(arrays["rng_state"])
            sources = [str(x) for x in arrays["seen_sources"].reshape(-1)]
            seqs = [int(x) for x in arrays["seen_seqs"].reshape(-1)]
            inserts, samples = int(arrays["limiter_inserts"]), int(arrays["limiter_samples"])
            rejected, duplicates = int(arrays["rejected"]), int(arrays["duplicates"])
            if len(sources) != len(seqs) or inserts < len(fresh) or samples < 0:
                raise ValueError("inconsistent counters or de-duplication table")
        except (KeyError, ValueError, TypeError) as exc:
            raise SnapshotError(f"replay snapshot {where!r} does not fit this replay server "
                                f"({exc})") from None
        extra = {k[6:]: arrays[k].item() for k in arrays if k.startswith("extra_")}
        with self.lock:
            self.buffer = fresh
            self.rng = rng
            self.seen = dict(zip(sources, seqs))
            self.limiter.inserts, self.limiter.samples = inserts, samples
            self.rejected, self.duplicates = rejected, duplicates
            self.restored = {"size": len(fresh), "inserted": inserts, "samples": samples,
                             "from_epoch": int(arrays["epoch"]), "extra": extra}
            return dict(self.restored)
