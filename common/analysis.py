"""Look inside a trained agent: record greedy trials with their internals, then decode and project.

:func:`record_trials` runs the trained policy greedily through the training loop's own
:class:`actors.collector.TrialCollector` (episodes of ``trials_per_episode`` trials, M kept
across the trials of an episode and reset between episodes, trials scored by
:class:`common.tasks.TrialOutcome`) and keeps, per step, the observation, action, ground truth,
reward, Q-values, the hidden activity h and the recurrent state ("M": the MPN's modulation matrix
after the step's update, flattened input-major; for the GRU its hidden state, for the LSTM its
hidden and cell state), and per trial NeuroGym's trial dict (the conditions), the outcome and
the position in its episode.  :func:`save_record` writes it as one numpy ``.npz`` (loadable with
``numpy.load`` alone; ``docs/analysis.md`` lists every array); :func:`load_record` reads it back
as a :class:`Record`.

The analyses use scikit-learn: :func:`decode_over_time` (cross-validated logistic regression of
a trial variable from h or M at each step after trial onset), :func:`cross_temporal` (train at
one step, test at every other), :func:`participation_ratio`, :func:`pca`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
M_FULL_MAX_FLOATS = 40_000_000      # larger M records are stored as their top principal components
M_PCA_COMPONENTS = 64


def _period_codes(start: dict, end: dict, length: int, names: list[str]) -> np.ndarray:
    """The period index (into ``names``) of every step 0..length-1 of a trial; -1 if none."""
    codes = np.full(length, -1, np.int16)
    for p in sorted(start, key=lambda p: (start[p], end[p])):
        if p not in names:
            names.append(p)
        a, b = int(start[p]), min(int(end[p]), length)
        if b > a:
            codes[a:b] = names.index(p)
    return codes


def _conditions(trial: dict) -> dict:
    """The numeric scalars (and small fixed-size numeric arrays) of NeuroGym's trial dict."""
    out = {}
    for k, v in (trial or {}).items():
        a = np.asarray(v)
        if a.dtype.kind in "biuf" and a.size <= 64:
            out[k] = a.astype(np.float64)
    return out


def record_trials(spec, params: dict, env_name: str, dt: int, *, num_trials: int = 500,
                  trials_per_episode: int = 10, seed: int = 0, num_envs: int = 8) -> dict:
    """Greedy trials with h, M, Q and their conditions (see the module docstring)."""
    from mpn_dqn.actors.collector import TrialCollector
    col = TrialCollector(env_name, dt, spec, params, num_envs=num_envs,
                         trials_per_episode=trials_per_episode, seed=seed + 3_000_000, actor_id=0)
    col.epsilon = 0.0
    K = col.K
    pending = [[] for _ in range(K)]                  # per env: (h, q, M) rows of the trial in progress
    trial_obj = [u.trial for u in col.units]          # NeuroGym's dict of the trial each env runs
    cur = [dict(trial=u.trial, start=dict(u.start_ind), end=dict(u.end_ind)) for u in col.units]
    period_names: list[str] = []
    trials, rows, infos = [], [], []
    while len(trials) < num_trials:
        done, _ = col.step()
        h = np.asarray(col.policy.last_h, np.float32)
        for k in range(K):
            pending[k].append((h[k].copy(), np.asarray(col.last_q[k], np.float32).copy(),
                               col.state[k].copy()))
        by_env = {t.env_id: t for t in done}
        for k, u in enumerate(col.units):
            if u.trial is trial_obj[k]:
                continue                               # env k's trial goes on
            t = by_env.get(k)                          # None: the spoiled first trial after reset
            if t is not None and len(trials) < num_trials:
                steps = pending[k][-t.length:]
                trials.append(t)
                rows.append(steps)
                infos.append(dict(cur[k], period=_period_codes(cur[k]["start"], cur[k]["end"],
                                                               t.length, period_names)))
            pending[k] = []
            trial_obj[k] = u.trial
            cur[k] = dict(trial=u.trial, start=dict(u.start_ind), end=dict(u.end_ind))
    col.close()
    return _assemble(spec, env_name, dt, trials, rows, infos, period_names, col.units[0])


def _assemble(spec, env_name, dt, trials, rows, infos, period_names, unit) -> dict:
    lengths = np.array([t.length for t in trials], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    steps = {
        "obs": np.concatenate([t.obs for t in trials]).astype(np.float32),
        "action": np.concatenate([t.actions for t in trials]).astype(np.int64),
        "gt": np.concatenate([t.gt.reshape(t.length, -1)[:, 0] for t in trials]).astype(np.int64),
        "reward": np.concatenate([t.rewards for t in trials]).astype(np.float32),
        "q": np.concatenate([np.stack([r[1] for r in rs]) for rs in rows]),
        "h": np.concatenate([np.stack([r[0] for r in rs]) for rs in rows]),
        "period": np.concatenate([i["period"] for i in infos]).astype(np.int16),
        "trial": np.repeat(np.arange(len(trials)), lengths).astype(np.int64),
        "t_in_trial": np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
    }
    M = np.concatenate([np.stack([r[2] for r in rs]) for rs in rows]).astype(np.float32)
    out = dict(steps)
    if M.size <= M_FULL_MAX_FLOATS:
        out["M"] = M
    else:                                             # too large to keep whole: its top PCs
        from sklearn.decomposition import PCA
        p = PCA(n_components=min(M_PCA_COMPONENTS, *M.shape), random_state=0).fit(M)
        out.update(M_pca=p.transform(M).astype(np.float32), M_pca_components=p.components_.astype(np.float32),
                   M_pca_mean=p.mean_.astype(np.float32),
                   M_pca_explained_variance_ratio=p.explained_variance_ratio_.astype(np.float32))
    out.update({
        "trial_offsets": offsets, "trial_length": lengths,
        "trial_correct": np.array([t.correct for t in trials], bool),
        "trial_fix_break": np.array([t.fix_breaks > 0 for t in trials], bool),
        "trial_premature": np.array([t.premature for t in trials], bool),
        "trial_ground_truth": np.array([t.ground_truth for t in trials], np.int64),
        "trial_in_episode": np.array([t.trial_index for t in trials], np.int64),
        "trial_episode": np.array([t.episode_id for t in trials], np.int64),
    })
    keys = sorted({k for i in infos for k in _conditions(i["trial"])})
    for k in keys:
        vals = [_conditions(i["trial"]).get(k) for i in infos]
        shapes = {None if v is None else v.shape for v in vals}
        if len(shapes) == 1 and None not in shapes:
            out[f"cond_{k}"] = np.stack(vals)
    names = lambda space: {k: (list(v) if not isinstance(v, int) else v)  # noqa: E731
                           for k, v in (getattr(space, "name", None) or {}).items()}
    out["meta_json"] = np.array(json.dumps({
        "format": FORMAT, "env_name": env_name, "dt": int(dt), "core": spec.core,
        "hidden_dim": int(spec.hidden_dim), "obs_dim": int(spec.obs_dim), "in_dim": int(spec.in_dim),
        "num_actions": int(spec.num_actions), "state_size": int(spec.state_size),
        "M_layout": ("M[t] is the MPN's modulation matrix after step t, shape (in_dim, hidden_dim) "
                     "flattened" if spec.core == "mpn" else "the core's recurrent state after step t "
                     "(GRU: h; LSTM: [h, c])"),
        "period_names": period_names, "observation_names": names(unit.observation_space),
        "action_names": names(unit.action_space),
    }))
    return out


def save_record(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **record)
    tmp.replace(path)
    return path


@dataclass
class Record:
    """A recorded analysis run (``trials.npz``) with helpers for trial-aligned arrays."""
    arrays: dict
    meta: dict

    def __getitem__(self, key):
        return self.arrays[key]

    @property
    def num_trials(self) -> int:
        return len(self.arrays["trial_length"])

    def state(self) -> np.ndarray:
        """M per step: the full flattened state, or its stored principal components."""
        return self.arrays["M"] if "M" in self.arrays else self.arrays["M_pca"]

    def conditions(self) -> dict[str, np.ndarray]:
        return {k[5:]: v for k, v in self.arrays.items() if k.startswith("cond_")}

    def aligned(self, x: np.ndarray) -> np.ndarray:
        """Per-step ``x`` [steps, D] as [trials, length, D] aligned at trial onset, ``length``
        the shortest trial's."""
        lens, offs = self.arrays["trial_length"], self.arrays["trial_offsets"]
        length = int(lens.min())
        out = np.empty((len(lens), length, x.shape[1]), np.float32)
        for i, o in enumerate(offs[:-1]):
            out[i] = x[o:o + length]
        return out

    def at_step(self, x: np.ndarray, step: int | str) -> np.ndarray:
        """``x`` at one step of every trial: an index from onset, or "first"/"last"."""
        offs, lens = self.arrays["trial_offsets"][:-1], self.arrays["trial_length"]
        idx = offs if step == "first" else (offs + lens - 1 if step == "last" else offs + int(step))
        return x[idx]

    def period_mask(self, name: str) -> np.ndarray:
        names = self.meta["period_names"]
        return self.arrays["period"] == names.index(name) if name in names else \
            np.zeros(len(self.arrays["period"]), bool)

    def condition_means(self, x: np.ndarray, labels: np.ndarray) -> dict:
        """The trial-averaged, onset-aligned trajectory of ``x`` for each value of ``labels``."""
        al = self.aligned(x)
        return {v: np.nanmean(al[labels == v], axis=0) for v in np.unique(labels)}


def load_record(path: str | Path) -> Record:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta_json")))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: analysis record format {meta.get('format')}, expected {FORMAT}")
    return Record(arrays, meta)


# -- analyses ---------------------------------------------------------------------------------------

def decodable(labels: np.ndarray, min_per_class: int = 5, max_classes: int = 12) -> bool:
    """A trial variable worth decoding: 2..max_classes values, each on ≥ min_per_class trials."""
    vals, counts = np.unique(labels, return_counts=True)
    return 2 <= len(vals) <= max_classes and counts.min() >= min_per_class


def _reduce(X: np.ndarray, n: int = 50) -> np.ndarray:
    """At most ``n`` principal components of ``X`` [N, D] (decoding from M's thousands of
    entries on a few hundred trials needs it)."""
    if X.shape[1] <= n:
        return X
    from sklearn.decomposition import PCA
    return PCA(n_components=n, random_state=0).fit_transform(X)


def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))


def decode(X: np.ndarray, y: np.ndarray, *, folds: int = 5, shuffle: bool = False, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic-regression decoder of ``y`` from ``X`` [N, D];
    ``shuffle``: with the labels permuted (the control: chance)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    y = np.unique(np.asarray(y), return_inverse=True)[1]      # class labels (values may be floats)
    if shuffle:
        y = np.random.default_rng(seed).permutation(y)
    X = np.nan_to_num(_reduce(np.asarray(X, np.float64)))
    if np.allclose(X.std(axis=0), 0):
        return float(np.max(np.unique(y, return_counts=True)[1]) / len(y))   # nothing to read
    cv = StratifiedKFold(n_splits=min(folds, int(np.unique(y, return_counts=True)[1].min())),
                         shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(cross_val_score(_classifier(), X, y, cv=cv).mean())


def decode_over_time(aligned: np.ndarray, y: np.ndarray, **kw) -> np.ndarray:
    """:func:`decode` at every step of onset-aligned ``aligned`` [trials, T, D]."""
    return np.array([decode(aligned[:, t], y, **kw) for t in range(aligned.shape[1])])


def cross_temporal(aligned: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Accuracy [T_train, T_test] of a decoder trained at one step and tested at every step
    (held-out trials of each fold)."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold
    y = np.unique(np.asarray(y), return_inverse=True)[1]
    N, T, D = aligned.shape
    X = np.nan_to_num(aligned.astype(np.float64))
    if D > 50:                                        # one projection for all steps
        X = PCA(n_components=50, random_state=0).fit_transform(X.reshape(N * T, D)).reshape(N, T, 50)
    acc = np.zeros((T, T))
    cv = StratifiedKFold(n_splits=min(folds, int(np.unique(y, return_counts=True)[1].min())),
                         shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for train, test in cv.split(X[:, 0], y):
            for t in range(T):
                if np.allclose(X[train, t].std(axis=0), 0):
                    acc[t] += np.max(np.unique(y[test], return_counts=True)[1]) / len(test)
                    continue
                clf = _classifier().fit(X[train, t], y[train])
                for s in range(T):
                    acc[t, s] += clf.score(X[test, s], y[test])
    return acc / cv.get_n_splits()


def participation_ratio(X: np.ndarray) -> float:
    """(Σλ)² / Σλ² of the covariance eigenvalues of ``X`` [N, D]: how many dimensions the
    activity spreads over (1: a line; D: all equally)."""
    X = np.asarray(X, np.float64)
    X = X - X.mean(axis=0)
    s = np.linalg.svd(X, compute_uv=False) ** 2
    return float(s.sum() ** 2 / max((s ** 2).sum(), 1e-300))


def pca(X: np.ndarray, n: int = 3):
    """(scores [N, n], explained variance ratios [n]) of sklearn's PCA."""
    from sklearn.decomposition import PCA
    p = PCA(n_components=min(n, *X.shape), random_state=0).fit(X)
    return p.transform(X), p.explained_variance_ratio_
