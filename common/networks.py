"""Q-networks: a recurrent core (MPN, GRU or LSTM) and one Q head, in torch and in numpy.

All cores share one interface::

    core.state_size                                   # floats of recurrent state per env
    core(obs [B,T,O], state [B,S], mask=None, reset=None) -> (h [B,T,H], state [B,S])

so the learner, the replay and the actors never look inside the state: for the MPN it is M
flattened (``I*H``), for the GRU it is h (``H``), for the LSTM it is ``[h, c]`` (``2H``).

:class:`QNetwork` (torch, the learner) and :class:`NumpyPolicy` (numpy, the actors) are built
from the same :class:`NetSpec` and the same parameter names; ``export_params`` turns the
torch weights into a ``{name: float32 array}`` dict that crosses the network (msgpack) and
loads into either.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from mpn_dqn.common import mpn_numba
from mpn_dqn.common.mpn import MPNCore, augment_obs_numpy, augment_obs_torch, mpn_step_numpy


@dataclass(frozen=True)
class NetSpec:
    """What it takes to build the same network in torch or numpy."""

    core: str
    obs_dim: int
    num_actions: int
    hidden_dim: int = 128
    eta: float = 0.1                  # MPN: η per step (the initial value when learned)
    lambda_decay: float = 0.95        # MPN: λ per step (the initial value when learned)
    learn_plasticity: bool = False
    lambda_max: float = 0.99          # MPN: the bound of a learned λ per step
    input_bias: float = 1.0
    dueling: bool = False
    time_scale: float = 1.0           # dt / 100 ms (MPNCore stores η and λ per 100 ms of task time)
    eta_min: Optional[float] = None   # MPN: the floor of a learned η per step (None: no floor)
    plasticity_per_unit: bool = False  # MPN: one η and λ per hidden unit instead of one for the layer

    @property
    def in_dim(self) -> int:
        return self.obs_dim + (1 if self.input_bias != 0 else 0)

    @property
    def state_size(self) -> int:
        if self.core == "mpn":
            return self.in_dim * self.hidden_dim
        if self.core == "gru":
            return self.hidden_dim
        if self.core == "lstm":
            return 2 * self.hidden_dim
        raise ValueError(f"unknown core {self.core!r}; use mpn, gru or lstm")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, cfg, obs_dim: int, num_actions: int) -> "NetSpec":
        return cls(core=cfg.core, obs_dim=obs_dim, num_actions=num_actions, hidden_dim=cfg.hidden_dim,
                   eta=cfg.effective_eta, lambda_decay=cfg.effective_lambda,
                   learn_plasticity=cfg.learn_plasticity, lambda_max=cfg.effective_lambda_max,
                   input_bias=cfg.input_bias, dueling=cfg.dueling, time_scale=cfg.dt / 100.0,
                   eta_min=cfg.effective_eta_min, plasticity_per_unit=cfg.plasticity_per_unit)


class GatedCore(nn.Module):
    """GRU or LSTM core with the same interface as :class:`MPNCore` (torch cell conventions)."""

    def __init__(self, kind: str, obs_dim: int, hidden_dim: int, input_bias: float = 1.0):
        super().__init__()
        self.kind = kind
        self.hidden_dim = hidden_dim
        self.input_bias = float(input_bias)
        in_dim = obs_dim + (1 if input_bias != 0 else 0)
        cell = nn.GRUCell if kind == "gru" else nn.LSTMCell
        self.cell = cell(in_dim, hidden_dim)
        self.state_size = hidden_dim if kind == "gru" else 2 * hidden_dim

    def initial_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device or self.cell.weight_ih.device)

    def forward(self, obs, state, mask=None, reset=None):
        B, T, _ = obs.shape
        x = augment_obs_torch(obs, self.input_bias)
        H = self.hidden_dim
        hs = []
        for t in range(T):
            if reset is not None:
                state = state * (~reset[:, t]).to(state.dtype)[:, None]
            if self.kind == "gru":
                h = self.cell(x[:, t], state)
                new = h
            else:
                h, c = self.cell(x[:, t], (state[:, :H], state[:, H:]))
                new = torch.cat([h, c], dim=1)
            state = torch.where(mask[:, t, None], new, state) if mask is not None else new
            hs.append(h)
        return torch.stack(hs, dim=1), state


class QNetwork(nn.Module):
    """Recurrent core + Q head.  ``forward(obs [B,T,O], state [B,S]) -> (q [B,T,A], state)``."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        if spec.core == "mpn":
            self.core = MPNCore(spec.obs_dim, spec.hidden_dim, eta_per_step=spec.eta,
                                lambda_per_step=spec.lambda_decay, learn_plasticity=spec.learn_plasticity,
                                lambda_max_per_step=spec.lambda_max, input_bias=spec.input_bias,
                                time_scale=spec.time_scale, eta_min_per_step=spec.eta_min,
                                per_unit=spec.plasticity_per_unit)
        elif spec.core in ("gru", "lstm"):
            self.core = GatedCore(spec.core, spec.obs_dim, spec.hidden_dim, spec.input_bias)
        else:
            raise ValueError(f"unknown core {spec.core!r}; use mpn, gru or lstm")
        self.head = nn.Linear(spec.hidden_dim, spec.num_actions)
        if spec.dueling:
            self.value = nn.Linear(spec.hidden_dim, 1)

    @property
    def state_size(self) -> int:
        return self.core.state_size

    def initial_state(self, batch: int, device=None) -> torch.Tensor:
        return self.core.initial_state(batch, device)

    def q_values(self, h: torch.Tensor) -> torch.Tensor:
        q = self.head(h)
        if self.spec.dueling:
            q = self.value(h) + q - q.mean(dim=-1, keepdim=True)
        return q

    def forward(self, obs, state, mask=None, reset=None):
        h, state = self.core(obs, state, mask=mask, reset=reset)
        return self.q_values(h), state

    def project_(self) -> None:
        """Constraints after an optimiser step (the MPN's bound on λ); a no-op for gated cores."""
        if isinstance(self.core, MPNCore):
            self.core.project_()


def export_params(net: QNetwork) -> dict[str, np.ndarray]:
    """Torch weights -> ``{name: float32 numpy array}`` (the format broadcast to actors)."""
    out = {}
    for name, t in net.state_dict().items():
        out[name] = t.detach().to("cpu", torch.float32).numpy().copy()
    if net.spec.core == "mpn":                   # η and λ per step and unit, as the actors' kernels use them
        eta, lam = net.core.plasticity()
        out["core.eta_value"] = eta.detach().to("cpu", torch.float32).numpy().copy()
        out["core.lambda_value"] = lam.detach().to("cpu", torch.float32).numpy().copy()
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))




class NumpyPolicy:
    """The Q-network in numpy for K envs at a time (no torch on the actor's hot path).

    ``q = policy.step(obs [K,O], state [K,S])`` advances ``state`` in place and returns
    Q-values [K,A].  Same maths as :class:`QNetwork` (checked by tests to 1e-5).  The MPN step
    runs in the fused kernel ``mpn_numba.policy_step`` for float32 C-contiguous states, else (or
    with ``use_kernel = False``) in the numpy reference ``mpn_step_numpy``.
    """

    use_kernel = True

    def __init__(self, spec: NetSpec, params: dict[str, np.ndarray]):
        self.spec = spec
        self.load(params)

    def load(self, params: dict[str, np.ndarray]) -> None:
        s = self.spec
        p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        self.head_wt = np.ascontiguousarray(p["head.weight"].T)
        self.head_b = p["head.bias"]
        if s.dueling:
            self.value_wt = np.ascontiguousarray(p["value.weight"].T)
            self.value_b = p["value.bias"]
        if s.core == "mpn":
            self.Wt = np.ascontiguousarray(p["core.W"].T)                # [I,H]
            self.b = p["core.b"]
            H = s.hidden_dim
            self.eta = np.ascontiguousarray(np.broadcast_to(p["core.eta_value"], (H,)))
            self.lam = np.ascontiguousarray(np.broadcast_to(p["core.lambda_value"], (H,)))
        else:
            self.w_ih_t = np.ascontiguousarray(p["core.cell.weight_ih"].T)   # [I, G*H]
            self.w_hh_t = np.ascontiguousarray(p["core.cell.weight_hh"].T)   # [H, G*H]
            self.b_ih = p["core.cell.bias_ih"]
            self.b_hh = p["core.cell.bias_hh"]
        self._work = None
        self._h = None

    def step(self, obs: np.ndarray, state: np.ndarray) -> np.ndarray:
        s = self.spec
        K = obs.shape[0]
        H = s.hidden_dim
        x = None if s.core == "mpn" else augment_obs_numpy(obs, s.input_bias)   # the MPN appends it itself
        if s.core == "mpn":
            M = state.reshape(K, s.in_dim, H)
            if self.use_kernel and M.dtype == np.float32 and obs.dtype == np.float32 \
                    and M.flags.c_contiguous:
                if self._h is None or self._h.shape[0] != K:
                    self._h = np.empty((K, H), np.float32)
                    self._x = np.empty((K, s.in_dim), np.float32)
                h = self._h
                mpn_numba.policy_step(obs, M, self.Wt, self.b, self.eta, self.lam,
                            np.float32(s.input_bias), h, self._x)
            else:
                if self._work is None or self._work.shape != M.shape:
                    self._work = np.empty_like(M)
                h = mpn_step_numpy(augment_obs_numpy(obs, s.input_bias), M, self.Wt, self.b,
                                   self.eta, self.lam, self._work)
        elif s.core == "gru":
            hprev = state
            gi = x @ self.w_ih_t + self.b_ih
            gh = hprev @ self.w_hh_t + self.b_hh
            r = _sigmoid(gi[:, :H] + gh[:, :H])
            z = _sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * hprev
            state[:] = h
        else:
            hprev, cprev = state[:, :H], state[:, H:]
            g = x @ self.w_ih_t + self.b_ih + hprev @ self.w_hh_t + self.b_hh
            i, f = _sigmoid(g[:, :H]), _sigmoid(g[:, H:2 * H])
            gg, o = np.tanh(g[:, 2 * H:3 * H]), _sigmoid(g[:, 3 * H:])
            c = f * cprev + i * gg
            h = o * np.tanh(c)
            state[:, H:] = c
            state[:, :H] = h
        q = h @ self.head_wt + self.head_b
        if s.dueling:
            q = (h @ self.value_wt + self.value_b) + q - q.mean(axis=1, keepdims=True)
        self.last_h = h              # the step's hidden activity [K,H] (a reused buffer: copy it)
        return q
