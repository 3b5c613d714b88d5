"""Replay server robustness: whole-message inserts, idempotent retries, checksummed snapshots,
atomic files, and bad messages rejected and counted on the real Ray replay actor."""
import io
import os

import msgpack
import numpy as np
import pytest
import torch

from mpn_dqn.common.codec import encode_trials
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.experiment import CheckpointError, Experiment, load_checkpoint
from mpn_dqn.replay.server import ReplayServer
from mpn_dqn.replay.snapshot import SnapshotError, pack_snapshot, unpack_snapshot, write_atomic
from tests.helpers import make_trial

SCHEMA = {"obs_dim": 3, "state_size": 8, "num_actions": 3, "max_burnin": 0}


def _server(**kw):
    base = dict(samples_per_insert=2.0, min_size=4, batch_size=4)
    base.update(kw)
    return ReplayServer(64, SCHEMA, **base)


def _msgs(seed, n, per=3):
    rng = np.random.default_rng(seed)
    return [encode_trials([make_trial(rng, int(rng.integers(2, 12))) for _ in range(per)])
            for _ in range(n)]


def test_a_message_is_inserted_whole_or_not_at_all():
    s = _server()
    rng = np.random.default_rng(1)
    good = [make_trial(rng, 5) for _ in range(3)]
    bad = make_trial(rng, 5)
    bad.actions[2] = 7                                    # outside [0, num_actions)
    res = s.insert(encode_trials([*good, bad]))
    assert res["status"] == "rejected" and "trials[3].actions" in res["reason"]
    st = s.stats()
    assert st["size"] == 0 and st["inserted"] == 0 and st["rejected"] == 1
    assert s.insert(encode_trials(good))["accepted"] == 3


def test_a_retried_message_is_never_stored_twice_even_across_a_restore():
    a = _server()
    m = _msgs(2, 4)
    assert [a.insert(m[i], "actor0-x", i)["accepted"] for i in range(2)] == [3, 3]
    again = a.insert(m[1], "actor0-x", 1)                  # no ack arrived: the actor retries
    assert again == {"status": "ok", "accepted": 0, "duplicate": True, "epoch": 0}
    assert a.insert(m[1], "actor1-y", 0)["accepted"] == 3  # another sender's numbering
    snap = a.snapshot({"episodes": 3})
    assert a.insert(m[2], "actor0-x", 2)["accepted"] == 3  # acked by a, after its snapshot
    b = _server(epoch=1)
    info = b.restore(snap)
    assert info["inserted"] == 9 and info["extra"] == {"episodes": 3}
    # the de-duplication table came back with the snapshot: old messages are dropped, the
    # one the snapshot missed is stored again (it was lost with a)
    assert b.insert(m[1], "actor0-x", 1)["duplicate"]
    assert b.insert(m[2], "actor0-x", 2)["accepted"] == 3
    st = b.stats()
    assert (st["size"], st["inserted"], st["epoch"], st["duplicates"]) == (12, 12, 1, 2)


def test_insert_with_a_malformed_sender_id_is_rejected_and_counted():
    s = _server()
    m = _msgs(3, 1)[0]
    for source, seq in (("", 0), ("x" * 65, 0), ("a", -1), ("a", "1"), (5, 1), ("a", None)):
        assert s.insert(m, source, seq)["status"] == "rejected"
    assert s.stats()["rejected"] == 6 and s.stats()["size"] == 0


def test_snapshot_restores_contents_counters_and_sampling_rng_exactly():
    a = _server()
    for i, m in enumerate(_msgs(4, 6)):
        a.insert(m, "s", i)
    for _ in range(3):
        a.sample(4)
    b = _server(seed=123)
    b.restore(a.snapshot())
    sa, sb = a.stats(), b.stats()
    for k in ("size", "inserted", "sampled", "rejected", "duplicates", "payload_nbytes"):
        assert sa[k] == sb[k], k
    for _ in range(3):                                     # the same batches from here on
        x, y = a.sample(4), b.sample(4)
        assert x is not None and x.batch_size == 4
        for name in ("slots", "obs", "actions", "init_state", "mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "no-checksum",
                                    "object-array"])
def test_a_damaged_snapshot_is_refused_naming_it_and_changes_nothing(damage):
    a = _server()
    for i, m in enumerate(_msgs(5, 3)):
        a.insert(m, "s", i)
    snap = a.snapshot()
    if damage == "truncate":
        data = snap[: len(snap) * 2 // 3]
    elif damage == "flip":
        arrays = unpack_snapshot(snap)
        off = snap.find(arrays["buf_obs"].tobytes()[:16])   # a byte of trial data
        data = bytearray(snap)
        data[off + 5] ^= 0x40
        data = bytes(data)
    elif damage == "garbage":
        data = os.urandom(5000)
    elif damage == "empty":
        data = b""
    elif damage == "no-checksum":
        buf = io.BytesIO()
        np.savez(buf, **{k: v for k, v in unpack_snapshot(snap).items()})
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        np.savez(buf, evil=np.array([{"x": 1}], dtype=object))
        data = buf.getvalue()
    b = _server()
    b.insert(_msgs(6, 1)[0])
    with pytest.raises(SnapshotError, match="NAMED.npz"):
        b.restore(data, "NAMED.npz")
    assert b.stats()["size"] == 3 and b.stats()["inserted"] == 3


def test_a_snapshot_of_another_buffer_configuration_is_refused():
    a = _server()
    a.insert(_msgs(7, 1)[0])
    other = ReplayServer(32, SCHEMA, samples_per_insert=2.0, min_size=4, batch_size=4)
    with pytest.raises(SnapshotError, match="does not fit"):
        other.restore(a.snapshot(), "snap.npz")


def test_snapshot_arrays_only_no_pickle():
    with pytest.raises(TypeError):
        pack_snapshot({"x": np.array([object()], dtype=object)})
    arrays = unpack_snapshot(_server().snapshot())
    assert all(a.dtype != object for a in arrays.values())


def test_atomic_write_killed_before_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "replay_snapshot.npz"
    write_atomic(path, b"old contents")

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new contents that never land")
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay_snapshot.npz"]


@pytest.mark.parametrize("die_at", ["fsync", "replace"])
def test_checkpoint_killed_mid_write_leaves_nothing_resume_would_load(tmp_path, monkeypatch, die_at):
    """A kill while the temp file is being made durable, or just before the rename: the new
    checkpoint never appears under its name and the previous one is still what resume loads."""
    import mpn_dqn.replay.snapshot as snap
    exp = Experiment(tmp_path, "x")
    exp.create(TrainConfig(experiment_name="x"))
    payload = {"learner": {"w": torch.arange(6.0)}, "spec": {}, "counters": {"episodes": 8}}
    exp.save_checkpoint(payload, "checkpoint_8.pt")

    def die(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(snap.os, die_at, die)
    with pytest.raises(KeyboardInterrupt):
        exp.save_checkpoint({**payload, "counters": {"episodes": 16}}, "checkpoint_16.pt")
    monkeypatch.undo()
    assert not (exp.checkpoint_dir / "checkpoint_16.pt").exists()
    assert not any(p.name.endswith(".tmp") for p in exp.checkpoint_dir.iterdir())
    latest = exp.latest_checkpoint()
    assert latest.name == "checkpoint_8.pt"
    assert load_checkpoint(latest)["counters"]["episodes"] == 8


def test_a_checkpoint_whose_content_changed_fails_its_checksum(tmp_path):
    exp = Experiment(tmp_path, "x")
    exp.create(TrainConfig(experiment_name="x"))
    path = exp.save_checkpoint({"learner": {"w": torch.arange(6.0)}, "spec": {},
                                "counters": {"episodes": 8}}, "checkpoint_8.pt")
    ck = torch.load(path, weights_only=True)
    ck["learner"]["w"][3] = 42.0                        # a silent bit of damage torch accepts
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="checkpoint_8.pt.*SHA-256"):
        load_checkpoint(path)


# --- the real Ray replay actor ------------------------------------------------------------------

def _bad_messages() -> dict:
    valid = _msgs(8, 1)[0]
    obj = msgpack.unpackb(valid, raw=False)
    huge_bin = b"\x83\xa6schema\xaempn-dqn/trials\xa1v\x02\xa3obs\x83\xa4data\xc6\xff\xff\xff\xf0"
    huge_arr = b"\x83\xa6schema\xaempn-dqn/trials\xa1v\x02\xa3obs\xdd\x7f\xff\xff\xff"
    declared = dict(obj)
    declared["obs"] = {"dtype": "<f4", "shape": [2 ** 40, 3], "data": b"\0" * 12}
    long = dict(obj)
    long["lengths"] = {"dtype": "<i8", "shape": [3], "data": np.array([2 ** 40, 1, 1]).tobytes()}
    flipped = bytearray(valid)
    flipped[len(valid) // 3] ^= 0xFF
    return {
        "random-bytes": os.urandom(300),
        "truncated": valid[: len(valid) // 2],
        "bit-flip": bytes(flipped),
        "huge-declared-length": msgpack.packb(long, use_bin_type=True),
        "wrong-structure": msgpack.packb({**obj, "obs": [[1, 2]]}, use_bin_type=True),
        "version-1": msgpack.packb({"schema": "mpn-dqn/trials", "v": 1, "trials": [[1, 2]]}),
        "wrong-schema": msgpack.packb({"schema": "pickle", "v": 1, "trials": []}),
        "huge-declared-bin": huge_bin,
        "huge-declared-array": huge_arr,
        "huge-declared-shape": msgpack.packb(declared, use_bin_type=True),
        "not-bytes": "a string, not bytes",
        "empty": b"",
    }


@pytest.mark.ray
def test_replay_actor_rejects_and_counts_bad_messages_and_keeps_going(ray_session):
    ray = ray_session
    server = ray.remote(num_cpus=0, max_concurrency=4)(ReplayServer).remote(
        64, SCHEMA, samples_per_insert=2.0, min_size=4, batch_size=4)
    try:
        bad = _bad_messages()
        for name, payload in bad.items():
            res = ray.get(server.insert.remote(payload), timeout=30)
            if name == "bit-flip" and res["status"] == "ok":
                continue            # a flip inside float data can leave a valid message
            assert res["status"] == "rejected", name
        for i, m in enumerate(_msgs(9, 2)):
            assert ray.get(server.insert.remote(m, "actor0-z", i), timeout=30)["accepted"] == 3
        st = ray.get(server.stats.remote(), timeout=30)
        assert st["rejected"] >= len(bad) - 1 and st["last_reject"]
        assert st["size"] >= 6
        assert ray.get(server.sample.remote(4), timeout=30) is not None   # still serving
    finally:
        ray.kill(server)


@pytest.mark.ray
def test_batches_through_shared_memory_equal_the_object_store_ones_and_leave_no_segment(ray_session):
    """Two replay-server actors with the same seed and the same trials (some longer than the
    first slot guess, so the client's slots grow): one read through shared memory, one
    through the object store, batch for batch equal; the segment's name is gone once the
    server has opened it, so a killed process leaks nothing."""
    import ray
    from mpn_dqn.driver.runtime.ray_roles import RayReplayClient
    Server = ray.remote(num_cpus=0, max_concurrency=4)(ReplayServer)
    servers = [Server.remote(64, SCHEMA, samples_per_insert=100.0, min_size=4, batch_size=4, seed=3)
               for _ in range(2)]
    rng = np.random.default_rng(0)
    msgs = [encode_trials([make_trial(rng, int(rng.integers(5, 120))) for _ in range(5)]) for _ in range(4)]
    for s in servers:
        for i, m in enumerate(msgs):
            assert ray.get(s.insert.remote(m, "a", i))["status"] == "ok"
    shared, plain = (RayReplayClient(s, 3, 8, held=2) for s in servers)
    plain.use_shared = False
    try:
        for _ in range(6):
            a, b = shared.sample(4), plain.sample(4)
            for name in ("obs", "actions", "rewards", "mask", "lengths", "init_state", "burnin_state"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert shared.use_shared and shared.shared is not None and shared.retired   # grown once
        assert not os.path.exists(f"/dev/shm/{shared.shared.name.lstrip('/')}")
    finally:
        shared.close()
        for s in servers:
            ray.kill(s)
