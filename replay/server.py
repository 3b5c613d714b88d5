"""The replay server: a trial buffer behind a lock, a samples-per-insert rate limiter, and
strict decoding of everything that arrives.  A plain class; ``driver/distributed.py`` makes it
a Ray actor (threaded, so inserts and samples run concurrently).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from common.codec import TrialDecodeError, TrialSchema, decode_trials
from replay.buffer import TrialBuffer
from replay.wire import encode_batch


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
    ``sample(n)`` returns a msgpack-encoded padded batch, or None when the rate limiter says wait.
    """

    def __init__(self, capacity: int, schema: dict, *, samples_per_insert: float, min_size: int,
                 batch_size: int, error_buffer: float | None = None, max_burnin: int = 0,
                 seed: int = 0):
        self.schema = TrialSchema(**schema)
        self.buffer = TrialBuffer(capacity, self.schema.obs_dim, self.schema.state_size,
                                  max_burnin=max_burnin, seed=seed)
        if error_buffer is None:
            error_buffer = max(2.0 * batch_size, 64.0 * samples_per_insert)
        self.limiter = RateLimiter(samples_per_insert, min_size, error_buffer, capacity=capacity,
                                   batch_size=batch_size)
        self.lock = threading.Lock()
        self.rng = np.random.default_rng([seed, 99])
        self.rejected = 0
        self.last_reject = ""
        self.insert_blocked = 0
        self.sample_blocked = 0
        self.bytes_in = 0
        self.t0 = time.time()

    def insert(self, payload: bytes) -> dict:
        """Returns {"status": "ok"|"retry"|"rejected", "accepted": n}.  "retry": the rate
        limiter holds the actors back; send the same payload again later."""
        with self.lock:
            if not self.limiter.can_insert():
                self.insert_blocked += 1
                return {"status": "retry", "accepted": 0}
        try:
            trials = decode_trials(payload, self.schema)
        except TrialDecodeError as exc:
            with self.lock:
                self.rejected += 1
                self.last_reject = str(exc)[:300]
            return {"status": "rejected", "accepted": 0, "reason": str(exc)[:300]}
        with self.lock:
            self.buffer.add_many(trials)
            self.limiter.inserts += len(trials)
            self.bytes_in += len(payload)
        return {"status": "ok", "accepted": len(trials)}

    def sample(self, batch_size: int, pad_multiple: int = 1) -> bytes | None:
        with self.lock:
            if not self.limiter.can_sample(batch_size):
                self.sample_blocked += 1
                return None
            batch = self.buffer.sample(batch_size, pad_multiple=pad_multiple, rng=self.rng)
            self.limiter.samples += batch_size
        return encode_batch(batch)

    def stats(self) -> dict:
        with self.lock:
            ins = self.limiter.inserts
            return {"size": len(self.buffer), "inserted": ins, "sampled": self.limiter.samples,
                    "samples_per_insert": (self.limiter.samples / ins) if ins else 0.0,
                    "rejected": self.rejected, "last_reject": self.last_reject,
                    "insert_blocked": self.insert_blocked, "sample_blocked": self.sample_blocked,
                    "bytes_in": self.bytes_in, "nbytes": self.buffer.nbytes(),
                    "payload_nbytes": self.buffer.payload_nbytes(), "uptime_s": time.time() - self.t0}
