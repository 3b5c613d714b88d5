"""The experiment directory: config.json, metrics.jsonl, checkpoints/, plots/.

Every file is written atomically (temp file + rename) so a run killed mid-write never leaves
a half-written checkpoint that ``resume`` or ``eval`` would load.  Checkpoints are plain dicts
of tensors and numbers, loaded with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from mpn_dqn.common.config import ConfigError, TrainConfig, check_experiment_name
from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
from mpn_dqn.replay.snapshot import write_atomic


def read_jsonl(path: str | os.PathLike) -> list:
    """The records of a JSON-lines file ([] if there is none); a line cut by a crash is
    skipped, the rest is intact."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


class ExperimentError(ValueError):
    """The experiment directory is missing, already exists, or holds an unreadable file."""


class ExperimentBusy(ExperimentError):
    """Another live process trains this experiment."""


class CheckpointError(ExperimentError):
    """A checkpoint file cannot be loaded; the message names the file."""


class WriteGuard:
    """Periodic writes (checkpoints, replay snapshots, metrics records) that fail — a full disk,
    a read-only remount — are reported once per streak of failures, counted (``io_errors`` in
    the metrics), and retried at the next interval while training goes on.  The files already
    written stay intact (every write is atomic).  The final checkpoint is not guarded: if even
    that cannot be written the run ends with one line and exit 2."""

    def __init__(self, log=print):
        self.log = log
        self.errors = 0
        self.failing: set[str] = set()

    def attempt(self, what: str, fn) -> bool:
        """Run the write ``fn``; it may return False to say nothing was due (no write made)."""
        try:
            wrote = fn()
        except OSError as exc:
            self.errors += 1
            if what not in self.failing:
                self.failing.add(what)
                self.log(f"Warning: could not write the {what} ({exc.strerror or exc}); training goes "
                         "on and tries again at the next interval")
            return False
        if wrote is False:
            return True
        if what in self.failing:
            self.failing.discard(what)
            self.log(f"Writing the {what} works again")
        return True


class Experiment:
    def __init__(self, root: str | os.PathLike, name: str):
        check_experiment_name(name)
        self.name = name
        self.dir = Path(root) / name

    # -- paths ----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self.dir / "plots"

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def check_new(cls, root: str, name: str, overwrite: bool) -> "Experiment":
        """Validate that a new run may use this name (writes nothing)."""
        exp = cls(root, name)
        if exp.dir.exists() and not overwrite:
            if exp.dir.is_dir() and not exp.checkpoints_newest_first():
                raise ExperimentError(f"experiment {str(exp.dir)!r} already exists but has no "
                                      "checkpoint to resume from (it stopped before its first one); "
                                      "pass --overwrite to start it again, or choose another "
                                      "--experiment-name")
            raise ExperimentError(f"experiment {str(exp.dir)!r} already exists; choose another "
                                  "--experiment-name, pass --overwrite to replace it, or use "
                                  "`resume` to continue it")
        return exp

    def create(self, cfg: TrainConfig, overwrite: bool = False) -> None:
        if self.dir.exists():
            if not overwrite:
                raise ExperimentError(f"experiment {str(self.dir)!r} already exists")
            shutil.rmtree(self.dir)
        self.checkpoint_dir.mkdir(parents=True)
        cfg.save(str(self.config_path))
        self.write_json("machine.json", machine())       # provenance: where the run trained

    @contextlib.contextmanager
    def lock(self, wait_s: float = 0.0):
        """Claim the experiment while the block runs: one driver per experiment.

        An exclusive ``flock`` on ``<root>/.<name>.lock`` (beside the directory, so that
        ``--overwrite`` deleting the directory cannot drop it).  The kernel releases it when the
        process ends, however it ends (SIGKILL included), so a dead driver never leaves a stale
        lock.  Raises :class:`ExperimentBusy`, naming the holder, if another process holds it."""
        import fcntl
        import socket
        path = self.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.time() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() < deadline:
                        time.sleep(0.5)
                        continue
                raise self._busy(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)                 # closing the descriptor releases the lock

    @property
    def lock_path(self) -> Path:
        return self.dir.parent / f".{self.name}.lock"

    def check_free(self) -> None:
        """Raise :class:`ExperimentBusy`, naming the holder, if a live driver holds the
        experiment's lock.  Creates and changes nothing (unlike :meth:`lock`)."""
        import fcntl
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:                  # no lock file (never run) or unreadable: nobody to name
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(fd) from None
        finally:
            os.close(fd)

    def _busy(self, fd: int) -> ExperimentBusy:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        return ExperimentBusy(f"experiment {self.name!r} is in use by {holder}, a training that is "
                              "still running; wait for it to end or stop it first (then `resume` "
                              "continues it)")

    @classmethod
    def open_existing(cls, root: str, name: str) -> "Experiment":
        exp = cls(root, name)
        if not exp.config_path.exists():
            names = sorted(p.parent.name for p in Path(root).glob("*/config.json")) if Path(root).exists() else []
            hint = f"; existing experiments: {', '.join(names)}" if names else f"; {root}/ holds none"
            raise ExperimentError(f"no experiment {name!r} under {root}/{hint}")
        return exp

    def load_config(self) -> TrainConfig:
        try:
            return TrainConfig.load(str(self.config_path))
        except ConfigError as exc:
            raise ExperimentError(f"{self.config_path}: {exc}") from exc

    # -- metrics --------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        """Append one JSON line.  Not atomic: a crash mid-write can leave a partial last line,
        which every reader skips; the next record starts on a line of its own."""
        clean = {k: _json_safe(v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        with open(self.metrics_path, "a+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end:
                fh.seek(end - 1)
                if fh.read(1) != b"\n":          # a line cut by a crash
                    line = "\n" + line
            fh.write(line.encode())
            fh.flush()

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def write_json(self, name: str, data: dict) -> Path:
        text = json.dumps({k: _json_safe(v) for k, v in data.items()}, indent=2) + "\n"
        return write_atomic(self.dir / name, text.encode())

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, payload: dict, filename: str) -> Path:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {k: v for k, v in payload.items() if k != "sha256"}
        payload["sha256"] = payload_digest(payload)     # verified by load_checkpoint
        buf = io.BytesIO()
        torch.save(payload, buf)
        return write_atomic(self.checkpoint_dir / filename, buf.getvalue())

    def latest_checkpoint(self) -> Path | None:
        """The newest of checkpoint_<episode>.pt and final_model.pt (by recorded progress)."""
        cands = self.checkpoints_newest_first()
        return cands[0] if cands else None

    def checkpoints_newest_first(self) -> list[Path]:
        """checkpoint_<episode>.pt and final_model.pt, newest (by recorded progress) first."""
        cands = list(self.checkpoint_dir.glob("checkpoint_*.pt"))
        final = self.checkpoint_dir / "final_model.pt"
        if final.exists():
            cands.append(final)
        # Rank by the episode recorded in the file, not by mtime alone: a copied directory
        # (cp -r, rsync without -t) scrambles mtimes and would resume from an older checkpoint.
        # At equal episodes final_model.pt wins (it is written after the periodic one).
        return sorted(cands, key=lambda p: (_checkpoint_episode(p), p.name == "final_model.pt",
                                            p.stat().st_mtime_ns, p.name), reverse=True)

    def resolve_checkpoint(self, name: str | None) -> Path:
        if name is None:
            for cand in ("selected_model.pt", "final_model.pt", "best_model.pt"):
                if (self.checkpoint_dir / cand).exists():
                    return self.checkpoint_dir / cand
            latest = self.latest_checkpoint()
            if latest is None:
                raise CheckpointError(f"experiment {self.name!r} has no checkpoint in {self.checkpoint_dir}")
            return latest
        p = Path(name)
        if not p.is_absolute() and not p.exists():
            p = self.checkpoint_dir / name
        if not p.exists():
            have = sorted(x.name for x in self.checkpoint_dir.glob("*.pt"))
            raise CheckpointError(f"checkpoint {name!r} not found; {self.name!r} has: {', '.join(have) or 'none'}")
        return p


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``; a damaged file gives a CheckpointError
    naming it."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        # one line: torch's messages can span lines and carry terminal colour codes
        reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())[:200]
        if "weights_only" in reason or "Weights only load failed" in reason:
            reason = "it holds pickled Python objects, which are never loaded (only tensors and plain data)"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: "
                              f"{reason}); it may be truncated or not a mpn-dqn checkpoint") from exc
    if not isinstance(data, dict) or "learner" not in data or "spec" not in data:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a mpn-dqn checkpoint (missing keys)")
    stored = data.pop("sha256", None)        # absent in checkpoints written before it existed
    if stored is not None and stored != payload_digest(data):
        raise CheckpointError(f"checkpoint {str(path)!r} fails its SHA-256 check; it is damaged")
    return data


def payload_digest(obj) -> str:
    """SHA-256 over a checkpoint payload's content (nested dicts/lists of tensors, numbers,
    strings), independent of how torch lays out the file."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=repr):
                h.update(repr(k).encode() + b"=")
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _checkpoint_episode(path: Path) -> int:
    """The episode a checkpoint was written at: from ``checkpoint_<episode>.pt``, else from its
    counters; -1 when unreadable (so a damaged file never outranks a good one)."""
    stem = path.stem
    if stem.startswith("checkpoint_") and stem[len("checkpoint_"):].isdigit():
        return int(stem[len("checkpoint_"):])
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["counters"]["episodes"])
    except Exception:  # noqa: BLE001 - ranked last; loading it later reports the error
        return -1


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):
        try:
            return _json_safe(v.item())
        except (ValueError, RuntimeError):
            return None
    return v


def machine() -> dict:
    """Where a result was measured: CPU count and model, GPU (if any), host name."""
    import platform
    import socket
    info = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "host": socket.gethostname(), "gpu": None}
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        info["cpu"] = name or info["cpu"]
    except OSError:
        pass
    try:
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no driver: no GPU to report
        pass
    return info


def load_policy_params(exp: Experiment, checkpoint: str | None) -> tuple[NetSpec, dict, dict, str]:
    cfg = exp.load_config()
    path = exp.resolve_checkpoint(checkpoint)
    ck = load_checkpoint(path)
    check_checkpoint_matches(ck, cfg, path)
    spec = NetSpec(**ck["spec"])
    net = QNetwork(spec)
    try:
        net.load_state_dict(ck["learner"]["online"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the network its spec describes "
                              f"({' '.join(str(exc).split())[:160]})") from exc
    return spec, export_params(net), ck, str(path)


# the config fields that make a checkpoint's network: they must agree with the experiment's config
NETWORK_FIELDS = ("env_name", "dt", "core", "hidden_dim", "dueling", "input_bias", "learn_plasticity",
                  "eta", "eta_per_100ms", "lambda_decay", "m_timescale_ms", "lambda_max",
                  "m_timescale_max_ms", "eta_min_per_100ms", "plasticity_per_unit")
# ... and those that make the replay snapshot's layout, which resume restores beside it
REPLAY_FIELDS = ("buffer_size", "replay_init", "burn_in_steps", "replay_shards")


def check_checkpoint_matches(ck: dict, cfg, path, fields: tuple = NETWORK_FIELDS) -> None:
    """One line naming the first disagreement between a checkpoint and the experiment's config
    (task, dt, observation and action sizes, core, hidden size, plasticity settings; and any
    other ``fields`` of the config the checkpoint was trained with)."""
    from mpn_dqn.common.tasks import task_dims
    try:
        spec = NetSpec(**ck["spec"])
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable network spec ({exc})") from exc
    stored = ck.get("config") or {}
    for f in fields:
        if f in stored and stored[f] != getattr(cfg, f):
            advice = ("it belongs to another experiment" if f in NETWORK_FIELDS else
                      "a resumed run keeps its replay layout: put that value back in config.json")
            raise CheckpointError(f"checkpoint {str(path)!r} was trained with {f} = {stored[f]!r} but the "
                                  f"experiment's config.json says {getattr(cfg, f)!r}; {advice}")
    obs_dim, num_actions = task_dims(cfg.env_name, cfg.dt)
    for what, have, want in (("observation size", spec.obs_dim, obs_dim),
                             ("number of actions", spec.num_actions, num_actions),
                             ("core", spec.core, cfg.core), ("hidden size", spec.hidden_dim, cfg.hidden_dim)):
        if have != want:
            raise CheckpointError(f"checkpoint {str(path)!r} has {what} {have!r} but {cfg.env_name} at "
                                  f"dt {cfg.dt} with this config needs {want!r}; it belongs to another "
                                  "experiment")
