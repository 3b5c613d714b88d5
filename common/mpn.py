"""The Multi-Plasticity Network (MPN): one definition of the maths, two implementations.

For one sequence, with x̃_t the observation with a constant channel appended (see below)::

    h_t = tanh(b + (W ⊙ (1 + M_{t-1})) x̃_t)          hidden activity, read by the Q head
    M_t = λ · M_{t-1} + η · h_t x̃_tᵀ                  fast Hebbian state (not a parameter)

W and b learn by backprop; η and λ are fixed or learnable (η any sign, λ in (0, λ_max], η
optionally floored), stored per 100 ms of task time (see :class:`MPNCore`).  M is the recurrent *state*: it persists across the trials of an
episode and is zeroed only between episodes.

Storage layout.  M is stored transposed, ``[..., I, H]`` (input index first).  Every term of
the step is then a broadcast over contiguous rows of length H, which was measured 3-6x faster
in numpy and torch than ``[..., H, I]``.  Flattened, the state of one env is a vector of
``I*H`` floats: that is what the trial record stores and what the replay starts from.

Why a constant input channel.  On the NeuroGym tasks this project targets the observation is
exactly all zeros at every decision step.  With x_t = 0 the pre-activation is ``b`` whatever M
holds, so a network that reads M only through the observation is blind exactly when it must
answer (the system this project grew from stayed at chance for this reason).  Appending a
constant c (``--input-bias``, default 1) to x gives every unit a learned weight W[:, c] that M
modulates: at a zero observation ``h = tanh(b + c·W[:, c] ⊙ (1 + M[:, c]))``, and
``M[:, c]`` is a decaying trace of each unit's past activity (``η·c·h_t`` accumulated) — i.e.
it carries what the stimulus did.  We prefer it to an input layer ``tanh(Ux + c)`` before the
plastic layer because it keeps the MPN's single-layer form (the paper's model, one matrix to
inspect in renders) and costs one column; a prototype measured both equally good, and without
either the agent stayed at chance.  ``tests/test_mpn.py`` checks that Q at a zero observation
depends on the earlier stimulus.

Implementations:
  * :class:`MPNCore` — torch, batched over trials ``[B, T]``, with optional per-step masks
    (a masked step leaves the state unchanged) and resets (state zeroed before the step);
    used by the learner.
  * :func:`mpn_step_numpy` / ``NumpyPolicy`` — numpy, batched over envs, in place, no torch;
    used by actors on the hot path.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def augment_obs_numpy(obs: np.ndarray, input_bias: float) -> np.ndarray:
    """``[..., O] -> [..., O+1]`` with the constant channel (or a copy when input_bias == 0)."""
    if input_bias == 0:
        return np.asarray(obs, dtype=np.float32)
    out = np.empty(obs.shape[:-1] + (obs.shape[-1] + 1,), dtype=np.float32)
    out[..., :-1] = obs
    out[..., -1] = input_bias
    return out


def augment_obs_torch(obs: torch.Tensor, input_bias: float) -> torch.Tensor:
    if input_bias == 0:
        return obs
    const = torch.full(obs.shape[:-1] + (1,), float(input_bias), dtype=obs.dtype, device=obs.device)
    return torch.cat([obs, const], dim=-1)


class MPNCore(nn.Module):
    """Batched torch MPN.  ``forward(obs [B,T,O], state [B,I*H]) -> (h [B,T,H], state)``."""

    kind = "mpn"
    use_scan = True     # the fused sequence op (MPNScan) for unmasked sequences; the loop is the reference
    use_cpu_kernels = True   # on CPU, the numba kernels of common/mpn_numba.py
    use_gpu_kernels = True   # on CUDA, the Triton kernels of common/mpn_triton.py when Triton is installed

    def __init__(self, obs_dim: int, hidden_dim: int, *, eta_per_step: float = 0.1,
                 lambda_per_step: float = 0.95, learn_plasticity: bool = False,
                 lambda_max_per_step: float = 0.99, input_bias: float = 1.0, time_scale: float = 1.0,
                 eta_min_per_step: float | None = None, per_unit: bool = False):
        super().__init__()
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0 (dt / 100 ms), got {time_scale}")
        if not 0 <= lambda_per_step <= 1:
            raise ValueError(f"lambda_per_step must be in [0, 1], got {lambda_per_step}")
        # η and λ are stored per 100 ms of task time, learned or fixed (s = time_scale = dt / 100 ms):
        #     η per step = s · eta_per_100ms,     λ per step = σ(lambda_logit_per_100ms) ** s
        # Adam moves every parameter by about lr per update whatever its scale, so a learned η or λ
        # stored per 100 ms moves as fast in task time at any dt.  The bounds (λ ≤ λ_max, η ≥ η_min)
        # are kept by one mechanism: the stored values are projected onto them at construction and
        # after every optimiser step (``project_``, which the learner calls).  The forward pass reads
        # them as they are, so the gradient is the unconstrained one and a value at its bound can
        # move back; a bound never rescales λ, so it does not slow λ's learning where it does not bind.
        self.time_scale = float(time_scale)
        self.obs_dim = obs_dim
        self.hidden_dim = hidden_dim
        self.input_bias = float(input_bias)
        self.in_dim = obs_dim + (1 if input_bias != 0 else 0)
        self.state_size = self.in_dim * hidden_dim
        self.learn_plasticity = learn_plasticity
        self.lambda_max_per_step = float(lambda_max_per_step)
        self.eta_min_per_step = None if eta_min_per_step is None else float(eta_min_per_step)
        bound = 1.0 / math.sqrt(self.in_dim)
        self.W = nn.Parameter(torch.empty(hidden_dim, self.in_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(hidden_dim))
        # Shared: one η and one λ for the layer (0-d).  Per unit: one η and one λ per hidden unit
        # ([H]); η starts equal everywhere and the units' time constants -1/ln λ start spread
        # geometrically from a tenth of the one λ_per_step gives up to it (a bank of memories
        # from short to long, each of which learns).
        self.per_unit = bool(per_unit)
        lam_100 = torch.tensor(float(lambda_per_step), dtype=torch.float64) ** (1.0 / self.time_scale)
        if self.per_unit:
            if 0 < float(lam_100) < 1:
                tau = -1.0 / torch.log(lam_100) * torch.logspace(-1, 0, hidden_dim, dtype=torch.float64)
                lam_100 = torch.exp(-1.0 / tau)
            else:
                lam_100 = lam_100.expand(hidden_dim).clone()
        if learn_plasticity:                 # a finite logit, so that λ can learn
            lam_100 = lam_100.clamp(1e-4, 1 - 1e-4)
        eta_100 = torch.full((hidden_dim,) if self.per_unit else (), float(eta_per_step) / self.time_scale)
        logit_100 = torch.logit(lam_100).float()                           # ±inf: λ 1 or 0
        if learn_plasticity:
            self.eta_per_100ms = nn.Parameter(eta_100)
            self.lambda_logit_per_100ms = nn.Parameter(logit_100)
        else:
            self.register_buffer("eta_per_100ms", eta_100)
            self.register_buffer("lambda_logit_per_100ms", logit_100)
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)
        self.project_()

    def plasticity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(η, λ) per step, one value per hidden unit ([H]; shared values repeated)."""
        s = self.time_scale
        eta, lam = self.eta_per_100ms * s, torch.sigmoid(self.lambda_logit_per_100ms) ** s
        return eta.expand(self.hidden_dim), lam.expand(self.hidden_dim)

    @torch.no_grad()
    def project_(self) -> None:
        """Put the stored λ and η back onto their bounds (λ ≤ λ_max, η ≥ η_min) after an
        optimiser step (projected gradient descent).  Plain in-place tensor maths: CUDA-graph
        safe.  The bounds are those of learned plasticity: fixed values are used as given."""
        if not self.learn_plasticity:
            return
        s = self.time_scale
        top = min(max(self.lambda_max_per_step ** (1.0 / s), 1e-6), 1 - 1e-6)
        self.lambda_logit_per_100ms.clamp_(max=math.log(top / (1 - top)))
        if self.eta_min_per_step is not None:
            self.eta_per_100ms.clamp_(min=self.eta_min_per_step / s)

    def _upgrade_state_dict(self, state_dict, prefix, *args) -> None:
        """Checkpoints that stored ``eta_param`` / ``lambda_logit`` load as today's parameters:
        learned, they were already per 100 ms; fixed, they held η and λ per step."""
        old_eta, old_lam = prefix + "eta_param", prefix + "lambda_logit"
        if old_eta not in state_dict or old_lam not in state_dict:
            return
        eta, lam = state_dict.pop(old_eta), state_dict.pop(old_lam)
        if not self.learn_plasticity:
            s = self.time_scale
            eta, lam = (eta.double() / s).to(eta.dtype), torch.logit(lam.double() ** (1.0 / s)).to(lam.dtype)
        state_dict[prefix + "eta_per_100ms"] = eta
        state_dict[prefix + "lambda_logit_per_100ms"] = lam

    def initial_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device or self.W.device)

    def forward(self, obs: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B,T,O]; state [B,I*H]; mask [B,T] bool (False: step leaves state unchanged);
        reset [B,T] bool (True: state zeroed before the step).  Returns h [B,T,H], state [B,I*H]."""
        B, T, _ = obs.shape
        x = augment_obs_torch(obs, self.input_bias)                     # [B,T,I]
        M = state.view(B, self.in_dim, self.hidden_dim)                 # [B,I,H]
        Wt = self.W.t()                                                 # [I,H]
        eta, lam = self.plasticity()
        if mask is None and reset is None and self.use_scan:
            hs, M = mpn_scan(x, M, Wt, self.b, eta, lam)                # same maths, fused backward
            return hs, M.reshape(B, self.state_size)
        xw = x @ Wt + self.b                                            # [B,T,H]: b + W x̃ (the "1 ⊙" part)
        hs = []
        for t in range(T):
            if reset is not None:
                M = M * (~reset[:, t]).to(M.dtype)[:, None, None]
            xt = x[:, t]                                                # [B,I]
            # (W ⊙ M) x̃ with M stored [I,H]:  sum_i x̃_i · W_t[i,:] · M[i,:]
            pre = xw[:, t] + torch.einsum("bi,bih->bh", xt, M * Wt)
            h = torch.tanh(pre)
            M_new = lam * M + eta * xt[:, :, None] * h[:, None, :]
            if mask is not None:
                M = torch.where(mask[:, t, None, None], M_new, M)
            else:
                M = M_new
            hs.append(h)
        return torch.stack(hs, dim=1), M.reshape(B, self.state_size)


def mpn_step_numpy(x: np.ndarray, M: np.ndarray, Wt: np.ndarray, b: np.ndarray, eta, lam,
                   work: np.ndarray | None = None) -> np.ndarray:
    """One MPN step for K envs, in place on M.

    x [K,I] (already augmented), M [K,I,H] (updated in place), Wt [I,H] = Wᵀ, b [H];
    eta, lam: scalars or [H] (one value per hidden unit).
    Returns h [K,H].  Same maths as :meth:`MPNCore.forward`.
    """
    if work is None:
        work = np.empty_like(M)
    np.multiply(M, Wt, out=work)                         # W ⊙ M (stored transposed)
    pre = x @ Wt + b                                     # b + W x̃
    pre += np.einsum("ki,kih->kh", x, work)              # + (W ⊙ M) x̃
    h = np.tanh(pre, out=pre)
    M *= lam
    np.multiply(x[:, :, None], h[:, None, :], out=work)
    work *= eta
    M += work
    return h


class MPNScan(torch.autograd.Function):
    """The MPN recurrence over a whole sequence with a hand-written backward.

    Same maths as the step loop in :meth:`MPNCore.forward` (no masks, no resets — the learner's
    training path), but autograd records one node instead of ~8 per step, and the backward
    is the recurrence written out (M stored ``[B,I,H]``, so every op is row-local):

        gh_t   = ∂L/∂h_t + η · Σ_i x̃_{t,i} gM_t[i,:]              (h_t also feeds M_t)
        ga_t   = gh_t ⊙ (1 - h_t²)
        gM_{t-1} = λ · gM_t + x̃_t ⊗ (ga_t ⊙ Wᵀ-row)               (M_{t-1} feeds a_t and M_t)
        ∂W[h,i] = Σ_{b,t} ga_t[h] x̃_{t,i} (1 + M_{t-1}[i,h]);  ∂b = Σ ga;
        ∂η[h] = Σ_{b,t,i} (gM_t ⊙ x̃_t h_tᵀ)[i,h];  ∂λ[h] = Σ_{b,t,i} (gM_t ⊙ M_{t-1})[i,h]

    Inputs: x [B,T,I] (augmented), M0 [B,I,H], Wt [I,H], b [H], eta [H], lam [H].
    Outputs: h [B,T,H], M_T [B,I,H].
    """

    @staticmethod
    def forward(ctx, x, M0, Wt, b, eta, lam):
        xs, Ms, hs = _scan_forward(x, M0, Wt, b, eta, lam, keep_states=True)
        ctx.save_for_backward(xs, Ms, hs, Wt, eta, lam)
        return hs.transpose(0, 1), Ms[-1].clone()

    @staticmethod
    def backward(ctx, g_h, g_MT):
        xs, Ms, hs, Wt, eta, lam = ctx.saved_tensors      # Ms[t] = M_{t-1}: the state step t read
        T, B, I = xs.shape
        H = Wt.shape[1]
        g_hs = g_h.transpose(0, 1).contiguous()           # [T,B,H]
        dtanh = 1 - hs * hs
        G = xs.new_empty(T + 1, B, I, H)                   # G[t+1] = ∂L/∂M_t; G[0] = ∂L/∂M0
        if g_MT is None:
            G[T].zero_()
        else:
            G[T].copy_(g_MT)
        XG = xs.new_empty(T, B, H)                         # Σ_i x_i G[t+1][i,:]
        GA = xs.new_empty(T, B, H)                         # ∂L/∂a_t (pre-activation)
        for t in range(T - 1, -1, -1):
            xt = xs[t]
            XG[t] = torch.bmm(xt.unsqueeze(1), G[t + 1]).squeeze(1)
            ga = torch.addcmul(g_hs[t], XG[t], eta, out=GA[t])   # ∂L/∂h_t (+ η Σ_i x_i gM via M_t)
            ga.mul_(dtanh[t])
            torch.mul(G[t + 1], lam, out=G[t]).addcmul_(xt.unsqueeze(2), ga.unsqueeze(1) * Wt)
        xf = xs.view(T * B, I)
        gaf = GA.view(T * B, H)
        # ∂Wt[i,h] = Σ_{t,b} x[i] ga[h] (1 + M_{t-1}[i,h])
        g_Wt = xf.t() @ gaf + (torch.bmm(xf.unsqueeze(2), gaf.unsqueeze(1)) * Ms[:T].reshape(T * B, I, H)).sum(0)
        g_b = gaf.sum(0)
        g_eta = (XG * hs).sum((0, 1)) if ctx.needs_input_grad[4] else None          # Σ gM_t ⊙ x_t h_tᵀ
        g_lam = (G[1:] * Ms[:T]).sum((0, 1, 2)) if ctx.needs_input_grad[5] else None   # Σ gM_t ⊙ M_{t-1}
        return (None, G[0].clone(), g_Wt, g_b, None if g_eta is None else g_eta.sum_to_size(eta.shape),
                None if g_lam is None else g_lam.sum_to_size(lam.shape))


def _scan_forward(x, M0, Wt, b, eta, lam, keep_states: bool):
    """Forward recurrence.  Returns (xs [T,B,I], Ms, hs [T,B,H]); with ``keep_states`` Ms is
    [T+1,B,I,H] (Ms[t] = the state step t read, Ms[T] the final one), else [2,B,I,H] ping-pong
    buffers with the final state at index T % 2."""
    B, T, I = x.shape
    H = Wt.shape[1]
    xs = x.transpose(0, 1).contiguous()                    # time-major [T,B,I]
    he = x.new_empty(B, H)                                 # η ⊙ h_t, for the Hebbian update
    Ms = x.new_empty((T + 1) if keep_states else 2, B, I, H)
    Ms[0].copy_(M0)
    hs = x.new_empty(T, B, H)
    xw = torch.addmm(b, xs.view(T * B, I), Wt).view(T, B, H)   # b + W x̃ for every step at once
    MW = x.new_empty(B, I, H)
    for t in range(T):
        cur, nxt = (t, t + 1) if keep_states else (t % 2, (t + 1) % 2)
        M = Ms[cur]
        torch.mul(M, Wt, out=MW)                           # (W ⊙ M), stored [I,H]
        pre = torch.baddbmm(xw[t].unsqueeze(1), xs[t].unsqueeze(1), MW)
        h = torch.tanh(pre.squeeze(1), out=hs[t])
        torch.mul(h, eta, out=he)
        torch.mul(M, lam, out=Ms[nxt]).addcmul_(xs[t].unsqueeze(2), he.unsqueeze(1))
    return xs, Ms, hs


def mpn_scan(x: torch.Tensor, M0: torch.Tensor, Wt: torch.Tensor, b: torch.Tensor,
             eta: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused MPN sequence (see :class:`MPNScan`). x [B,T,I], M0 [B,I,H] -> (h [B,T,H], M_T).

    eta and lam are [H] (one value per hidden unit) or 0-d (shared).  Without gradients (target
    network, burn-in, evaluation) the per-step states are not kept."""
    H = Wt.shape[1]
    eta, lam = eta.expand(H), lam.expand(H)
    cpu = _use_cpu_kernels(x)
    gpu = not cpu and _use_triton_kernels(x)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, M0, Wt, b, eta, lam))):
        with torch.no_grad():
            if cpu:
                xs, Ms, hs = _numba_scan_forward(x, M0, Wt, b, eta, lam, keep_states=False)
                return hs.transpose(0, 1), Ms[x.shape[1] % 2].clone()
            if gpu:
                from mpn_dqn.common import mpn_triton
                hs, MT, _ = mpn_triton.scan_forward(x, M0, Wt, b, eta, lam, keep_states=False)
                return hs, MT
            xs, Ms, hs = _scan_forward(x, M0, Wt, b, eta, lam, keep_states=False)
            return hs.transpose(0, 1), Ms[x.shape[1] % 2].clone()
    return (MPNScanCPU if cpu else MPNScanTriton if gpu else MPNScan).apply(x, M0, Wt, b, eta, lam)


class MPNScanTriton(torch.autograd.Function):
    """:class:`MPNScan` as two fused Triton kernels (``common/mpn_triton.py``), for CUDA."""

    @staticmethod
    def forward(ctx, x, M0, Wt, b, eta, lam):
        from mpn_dqn.common import mpn_triton
        x = x.detach().contiguous()
        hs, MT, Ms = mpn_triton.scan_forward(x, M0.detach(), Wt.detach(), b.detach(), eta.detach(),
                                             lam.detach(), keep_states=True)
        ctx.save_for_backward(x, Ms, hs, Wt, eta, lam)
        return hs, MT

    @staticmethod
    def backward(ctx, g_h, g_MT):
        from mpn_dqn.common import mpn_triton
        x, Ms, hs, Wt, eta, lam = ctx.saved_tensors
        gM0, gWt, gb, geta, glam = mpn_triton.scan_backward(x, Ms, hs, Wt.detach(), eta.detach(),
                                                            lam.detach(), g_h, g_MT)
        return (None, gM0, gWt, gb,
                geta.to(eta.dtype).sum_to_size(eta.shape) if ctx.needs_input_grad[4] else None,
                glam.to(lam.dtype).sum_to_size(lam.shape) if ctx.needs_input_grad[5] else None)


class MPNScanCPU(torch.autograd.Function):
    """:class:`MPNScan` with the loops in compiled CPU kernels (``common/mpn_numba.py``)."""

    @staticmethod
    def forward(ctx, x, M0, Wt, b, eta, lam):
        xs, Ms, hs = _numba_scan_forward(x, M0, Wt, b, eta, lam, keep_states=True)
        ctx.save_for_backward(xs, Ms, hs, Wt, eta, lam)
        return hs.transpose(0, 1), Ms[-1].clone()

    @staticmethod
    def backward(ctx, g_h, g_MT):
        from mpn_dqn.common import mpn_numba
        xs, Ms, hs, Wt, eta, lam = ctx.saved_tensors
        T, B, I = xs.shape
        H = Wt.shape[1]
        g_hs = g_h.transpose(0, 1).contiguous() if g_h is not None else xs.new_zeros(T, B, H)
        g_MT = g_MT.contiguous() if g_MT is not None else xs.new_zeros(B, I, H)
        gM0 = xs.new_empty(B, I, H)
        gWt = xs.new_zeros(I, H)
        gb = xs.new_zeros(H)
        ge = xs.new_zeros(H)
        gl = xs.new_zeros(H)
        mpn_numba.scan_backward(
            xs.numpy(), Ms.numpy(), hs.numpy(), Wt.detach().contiguous().numpy(),
            per_unit_vector(eta, H, xs).numpy(), per_unit_vector(lam, H, xs).numpy(), g_hs.numpy(),
            g_MT.numpy(), gM0.numpy(), gWt.numpy(), gb.numpy(), ge.numpy(), gl.numpy())
        return (None, gM0, gWt, gb, ge.to(eta.dtype).sum_to_size(eta.shape) if ctx.needs_input_grad[4] else None,
                gl.to(lam.dtype).sum_to_size(lam.shape) if ctx.needs_input_grad[5] else None)


def _use_cpu_kernels(x: torch.Tensor) -> bool:
    return MPNCore.use_cpu_kernels and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _use_triton_kernels(x: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or not MPNCore.use_gpu_kernels:
        return False
    from mpn_dqn.common import mpn_triton
    return mpn_triton.available(x.device) and x.shape[-1] <= mpn_triton.MAX_IN_DIM


def _numba_scan_forward(x, M0, Wt, b, eta, lam, keep_states: bool):
    """The numba forward kernel on x [B,T,I]: (xs [T,B,I], Ms, hs [T,B,H]).  Ms is every state
    [T+1,B,I,H] with ``keep_states``, else the two ping-pong states [2,B,I,H]."""
    from mpn_dqn.common import mpn_numba
    B, T, I = x.shape
    H = Wt.shape[1]
    xs = x.detach().transpose(0, 1).contiguous()
    Ms = x.new_empty(T + 1 if keep_states else 2, B, I, H)
    hs = x.new_empty(T, B, H)
    mpn_numba.scan_forward(xs.numpy(), M0.detach().contiguous().numpy(), Wt.detach().contiguous().numpy(),
                           b.detach().contiguous().numpy(), per_unit_vector(eta, H, x).numpy(),
                           per_unit_vector(lam, H, x).numpy(), Ms.numpy(), hs.numpy())
    return xs, Ms, hs


def per_unit_vector(v: torch.Tensor, H: int, like: torch.Tensor) -> torch.Tensor:
    """η or λ ([H], or 0-d: repeated) as a contiguous [H] tensor of ``like``'s dtype, as the
    numba and Triton kernels read them."""
    return v.detach().to(like.dtype).expand(H).contiguous()
