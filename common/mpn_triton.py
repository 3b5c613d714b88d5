"""GPU kernels for the MPN sequence (forward and hand-written backward), written in Triton.

The same recurrence and backward as :class:`common.mpn.MPNScan` (its docstring has the
equations), fused over time: one Triton program per (trial, block of hidden units) runs the
whole sequence with its slice of M (``[I, BLOCK_H]``, I = obs + 1 ≤ 16) in registers.  This
works because the recurrence is row-local — hidden unit h only ever reads and writes column h
of M (stored ``[I,H]``) — so no program needs another's state.  One launch replaces the ~4
torch kernels per step of the eager scan (and ~5 per step of its backward).

Forward (per step t, per unit h)::

    a_t[h] = b[h] + Σ_i x_t[i] · Wt[i,h] · (1 + M_{t-1}[i,h]);   h_t = tanh(a_t)
    M_t[i,h] = λ[h] M_{t-1}[i,h] + η[h] x_t[i] h_t[h]

With gradients the forward also writes every M_{t-1} (``Ms [B,T,I,H]``); the backward walks
time in reverse with ∂L/∂M in registers and writes per-trial partial sums of ∂W, ∂b, ∂η, ∂λ,
which are summed over the batch in torch (deterministic: no atomics).

η and λ are read from device memory (one value per hidden unit), not baked in as constants, so a CUDA graph
that captured these launches keeps using the current (learnable) values.

Used automatically by :func:`common.mpn.mpn_scan` for float32 CUDA tensors when Triton is
importable (``MPN_DQN_TRITON=0`` turns it off).  Tests run the kernels on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``) against the torch scan.
"""
from __future__ import annotations

import os

import torch

from mpn_dqn.common.mpn import per_unit_vector

try:  # Triton is optional: without it the eager torch scan runs on the GPU
    import triton
    import triton.language as tl
    _HAVE_TRITON = os.environ.get("MPN_DQN_TRITON", "1") != "0"
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_IN_DIM = 16


def available(device: torch.device | None = None) -> bool:
    """True when the kernels can run on ``device`` (CUDA; or any device under the interpreter)."""
    if not _HAVE_TRITON:
        return False
    if _INTERPRET:
        return True
    return device is None or device.type == "cuda"


if triton is not None:
    @triton.jit
    def _tanh(a):
        # tanh(a) = 1 - 2 / (exp(2a) + 1): exact limits ±1 when exp over/underflows
        return 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)

    @triton.jit
    def _program_tile(I, H, IP: tl.constexpr, BH: tl.constexpr):
        """This program's trial and block of hidden units: the trial index, the unit and input
        offsets, their masks, and the flat [I, H] offsets of its tile of M (shared by both
        kernels, which must agree on the tiling)."""
        pid_b = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
        offs_i = tl.arange(0, IP)
        h_ok = offs_h < H
        i_ok = offs_i < I
        ih_ok = i_ok[:, None] & h_ok[None, :]
        ih = offs_i[:, None] * H + offs_h[None, :]
        return pid_b, offs_h, offs_i, h_ok, i_ok, ih_ok, ih

    @triton.jit
    def _scan_fwd_kernel(x_ptr, m0_ptr, wt_ptr, b_ptr, eta_ptr, lam_ptr, h_ptr, ms_ptr, mt_ptr,
                         T, I, H,
                         STORE_STATES: tl.constexpr, IP: tl.constexpr, BH: tl.constexpr):
        """x [B,T,I]; M0 [B,I,H]; Wt [I,H]; b [H] -> h [B,T,H], M_T [B,I,H] (+ Ms [B,T,I,H])."""
        pid_b, offs_h, offs_i, h_ok, i_ok, ih_ok, ih = _program_tile(I, H, IP, BH)
        M = tl.load(m0_ptr + pid_b * I * H + ih, mask=ih_ok, other=0.0)
        Wt = tl.load(wt_ptr + ih, mask=ih_ok, other=0.0)
        bias = tl.load(b_ptr + offs_h, mask=h_ok, other=0.0)
        eta = tl.load(eta_ptr + offs_h, mask=h_ok, other=0.0)[None, :]     # per unit [1,BH]
        lam = tl.load(lam_ptr + offs_h, mask=h_ok, other=0.0)[None, :]
        for t in range(T):
            row = pid_b * T + t
            x = tl.load(x_ptr + row * I + offs_i, mask=i_ok, other=0.0)
            if STORE_STATES:
                tl.store(ms_ptr + row * I * H + ih, M, mask=ih_ok)          # M_{t-1}: what step t reads
            a = bias + tl.sum(x[:, None] * Wt * (1.0 + M), axis=0)
            h = _tanh(a)
            tl.store(h_ptr + row * H + offs_h, h, mask=h_ok)
            M = lam * M + eta * x[:, None] * h[None, :]
        tl.store(mt_ptr + pid_b * I * H + ih, M, mask=ih_ok)

    @triton.jit
    def _scan_bwd_kernel(x_ptr, ms_ptr, h_ptr, gh_ptr, gmt_ptr, wt_ptr, eta_ptr, lam_ptr,
                         gm0_ptr, gwt_ptr, gb_ptr, geta_ptr, glam_ptr,
                         T, I, H, IP: tl.constexpr, BH: tl.constexpr):
        """Reverse pass.  Writes ∂M0 [B,I,H] and per-trial partials ∂Wt [B,I,H], ∂b [B,H],
        ∂η [B,H], ∂λ [B,I,H] (summed over B by the caller)."""
        pid_b, offs_h, offs_i, h_ok, i_ok, ih_ok, ih = _program_tile(I, H, IP, BH)
        G = tl.load(gmt_ptr + pid_b * I * H + ih, mask=ih_ok, other=0.0)   # ∂L/∂M_t, t = T-1 first
        Wt = tl.load(wt_ptr + ih, mask=ih_ok, other=0.0)
        eta = tl.load(eta_ptr + offs_h, mask=h_ok, other=0.0)             # per unit [BH]
        lam = tl.load(lam_ptr + offs_h, mask=h_ok, other=0.0)[None, :]
        acc_w = tl.zeros((IP, BH), dtype=tl.float32)
        acc_l = tl.zeros((IP, BH), dtype=tl.float32)
        acc_b = tl.zeros((BH,), dtype=tl.float32)
        acc_e = tl.zeros((BH,), dtype=tl.float32)
        for k in range(T):
            t = T - 1 - k
            row = pid_b * T + t
            x = tl.load(x_ptr + row * I + offs_i, mask=i_ok, other=0.0)
            h = tl.load(h_ptr + row * H + offs_h, mask=h_ok, other=0.0)
            gh = tl.load(gh_ptr + row * H + offs_h, mask=h_ok, other=0.0)
            Mp = tl.load(ms_ptr + row * I * H + ih, mask=ih_ok, other=0.0)  # M_{t-1}
            xg = tl.sum(x[:, None] * G, axis=0)                            # Σ_i x_i ∂L/∂M_t[i,:]
            ga = (gh + eta * xg) * (1.0 - h * h)                           # ∂L/∂a_t
            xga = x[:, None] * ga[None, :]
            acc_w += xga * (1.0 + Mp)
            acc_b += ga
            acc_e += xg * h
            acc_l += G * Mp
            G = lam * G + xga * Wt                                         # ∂L/∂M_{t-1}
        base = pid_b * I * H + ih
        tl.store(gm0_ptr + base, G, mask=ih_ok)
        tl.store(gwt_ptr + base, acc_w, mask=ih_ok)
        tl.store(glam_ptr + base, acc_l, mask=ih_ok)
        tl.store(gb_ptr + pid_b * H + offs_h, acc_b, mask=h_ok)
        tl.store(geta_ptr + pid_b * H + offs_h, acc_e, mask=h_ok)


def _launch_shape(I: int, H: int) -> tuple[int, int]:
    if I > MAX_IN_DIM:
        raise ValueError(f"the Triton MPN scan supports at most {MAX_IN_DIM} inputs (obs + 1), got {I}")
    ip = max(2, 1 << (I - 1).bit_length())              # next power of two (tl.arange needs one)
    bh = min(128, max(16, 1 << (H - 1).bit_length()))
    return ip, bh


def scan_forward(x: torch.Tensor, M0: torch.Tensor, Wt: torch.Tensor, b: torch.Tensor,
                 eta: torch.Tensor, lam: torch.Tensor, keep_states: bool):
    """x [B,T,I] float32 -> (h [B,T,H], M_T [B,I,H], Ms [B,T,I,H] or None)."""
    B, T, I = x.shape
    H = Wt.shape[1]
    ip, bh = _launch_shape(I, H)
    x = x.contiguous()
    h = x.new_empty(B, T, H)
    MT = x.new_empty(B, I, H)
    Ms = x.new_empty(B, T, I, H) if keep_states else MT      # unused pointer without states
    grid = (B, triton.cdiv(H, bh))
    _scan_fwd_kernel[grid](x, M0.contiguous(), Wt.contiguous(), b.contiguous(),
                           per_unit_vector(eta, H, x), per_unit_vector(lam, H, x), h, Ms, MT,
                           T, I, H, STORE_STATES=keep_states, IP=ip, BH=bh, num_warps=4)
    return h, MT, (Ms if keep_states else None)


def scan_backward(x, Ms, h, Wt, eta, lam, g_h, g_MT):
    """Gradients of the scan: (∂M0 [B,I,H], ∂Wt [I,H], ∂b [H], ∂η [H], ∂λ [H]) as tensors."""
    B, T, I = x.shape
    H = Wt.shape[1]
    ip, bh = _launch_shape(I, H)
    g_h = x.new_zeros(B, T, H) if g_h is None else g_h.contiguous()
    g_MT = x.new_zeros(B, I, H) if g_MT is None else g_MT.contiguous()
    gM0 = x.new_empty(B, I, H)
    gWt = x.new_empty(B, I, H)
    glam = x.new_empty(B, I, H)
    gb = x.new_empty(B, H)
    geta = x.new_empty(B, H)
    grid = (B, triton.cdiv(H, bh))
    _scan_bwd_kernel[grid](x.contiguous(), Ms, h.contiguous(), g_h, g_MT, Wt.contiguous(),
                           per_unit_vector(eta, H, x), per_unit_vector(lam, H, x),
                           gM0, gWt, gb, geta, glam,
                           T, I, H, IP=ip, BH=bh, num_warps=4)
    return gM0, gWt.sum(0), gb.sum(0), geta.sum(0), glam.sum((0, 1))

