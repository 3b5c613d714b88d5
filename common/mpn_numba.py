"""CPU kernels for the MPN sequence (forward and hand-written backward), compiled with numba.

The same recurrence as :class:`common.mpn.MPNScan` (see its docstring for the equations), but
one pass per trial with that trial's M (``[I,H]``, a few KiB) kept hot in cache, instead of
~5 torch ops per step over the whole batch.  Used by ``mpn_scan`` for CPU tensors
(``MPNCore.use_cpu_kernels = False`` selects the torch path instead); tests check it against
the torch path.  Layout: time-major, x [T,B,I], M [B,I,H].
"""
from __future__ import annotations

import numba
import numpy as np

@numba.njit(cache=True, inline="always")
def _tanh(v):
    # tanh via one exp (cheaper than libm's tanh): (1 - e) / (1 + e), e = exp(-2|v|)
    e = np.exp(-2.0 * abs(v))
    r = (1.0 - e) / (1.0 + e)
    return r if v >= 0 else -r

@numba.njit(cache=True, fastmath=False, nogil=True)
def scan_forward(xs, M0, Wt, b, eta, lam, Ms, hs):
    """xs [T,B,I]; M0 [B,I,H]; Wt [I,H]; b, eta, lam [H].  Writes Ms [T+1,B,I,H] (Ms[t] = state read by
    step t) and hs [T,B,H].  (Ms may have leading size 2 to keep only ping-pong states.)"""
    T, B, I = xs.shape
    H = Wt.shape[1]
    keep = Ms.shape[0] == T + 1
    M = np.empty((I, H), dtype=xs.dtype)
    pre = np.empty(H, dtype=xs.dtype)
    eh = np.empty(H, dtype=xs.dtype)
    for bb in range(B):
        M[:, :] = M0[bb]
        for t in range(T):
            if keep:
                Ms[t, bb] = M
            for h in range(H):
                pre[h] = b[h]
            for i in range(I):
                xi = xs[t, bb, i]
                if xi != 0.0:
                    for h in range(H):
                        pre[h] += xi * Wt[i, h] * (1.0 + M[i, h])
            for h in range(H):
                hs[t, bb, h] = _tanh(pre[h])
                eh[h] = eta[h] * hs[t, bb, h]
            for i in range(I):
                xi = xs[t, bb, i]
                for h in range(H):
                    M[i, h] = lam[h] * M[i, h] + xi * eh[h]
        if keep:
            Ms[T, bb] = M
        else:
            Ms[T % 2, bb] = M

@numba.njit(cache=True, fastmath=False, nogil=True)
def scan_backward(xs, Ms, hs, Wt, eta, lam, g_hs, g_MT, gM0, gWt, gb, g_eta, g_lam):
    """Reverse pass.  eta, lam [H]; g_hs [T,B,H]; g_MT [B,I,H] (∂L/∂M_T).  Writes gM0 [B,I,H],
    and accumulates gWt [I,H], gb [H], g_eta [H], g_lam [H]."""
    T, B, I = xs.shape
    H = Wt.shape[1]
    G = np.empty((I, H), dtype=xs.dtype)
    ga = np.empty(H, dtype=xs.dtype)
    for bb in range(B):
        G[:, :] = g_MT[bb]
        for t in range(T - 1, -1, -1):
            # G = ∂L/∂M_t.  h_t feeds M_t: ∂L/∂h_t += η Σ_i x_i G[i,:]
            for h in range(H):
                ga[h] = 0.0
            for i in range(I):
                xi = xs[t, bb, i]
                if xi != 0.0:
                    for h in range(H):
                        ga[h] += xi * G[i, h]
            for h in range(H):
                hv = hs[t, bb, h]
                g_eta[h] += ga[h] * hv
                ga[h] = (g_hs[t, bb, h] + eta[h] * ga[h]) * (1.0 - hv * hv)
                gb[h] += ga[h]
            for i in range(I):
                xi = xs[t, bb, i]
                for h in range(H):
                    m = Ms[t, bb, i, h]
                    g_lam[h] += G[i, h] * m
                    gxa = xi * ga[h]
                    gWt[i, h] += gxa * (1.0 + m)
                    G[i, h] = lam[h] * G[i, h] + gxa * Wt[i, h]
        gM0[bb] = G



@numba.njit(cache=True, fastmath=True, nogil=True)
def _policy_pre(obs, M, Wt, b, input_bias, x_out, pre_out):
    """x̃ = [obs, input_bias] -> x_out [K,I];  b + (W ⊙ (1 + M)) x̃ -> pre_out [K,H]."""
    K, O = obs.shape
    I, H = Wt.shape
    one = M.dtype.type(1.0)
    for k in range(K):
        for i in range(O):
            x_out[k, i] = obs[k, i]
        if I > O:
            x_out[k, O] = input_bias
        for h in range(H):
            pre_out[k, h] = b[h]
        for i in range(I):
            xi = x_out[k, i]
            if xi != 0.0:
                for h in range(H):
                    pre_out[k, h] += xi * Wt[i, h] * (one + M[k, i, h])

@numba.njit(cache=True, fastmath=True, nogil=True)
def _policy_hebb(x, h, M, eta, lam):
    """M <- λ M + η x̃ hᵀ, in place (M [K,I,H]; η, λ [H]: one value per hidden unit)."""
    K, I, H = M.shape
    eh = np.empty(H, dtype=M.dtype)
    for k in range(K):
        for hh in range(H):
            eh[hh] = eta[hh] * h[k, hh]
        for i in range(I):
            xi = x[k, i]
            for hh in range(H):
                M[k, i, hh] = lam[hh] * M[k, i, hh] + xi * eh[hh]

def policy_step(obs, M, Wt, b, eta, lam, input_bias, h_out, x_work):
    """One MPN step for K envs, the actor's hot path (same maths as ``mpn_step_numpy``).

    obs [K,O] raw observations (the constant channel ``input_bias`` is appended when it is
    non-zero, so I = O+1; otherwise I = O); M [K,I,H] float32, updated in place; Wt [I,H];
    b, eta, lam [H].  Writes h [K,H] into ``h_out`` (x_work [K,I] is scratch).  Two compiled loops
    around numpy's vectorised float32 tanh (a scalar tanh in the loop cost 2/3 of the step).
    """
    _policy_pre(obs, M, Wt, b, input_bias, x_work, h_out)
    np.tanh(h_out, out=h_out)
    _policy_hebb(x_work, h_out, M, eta, lam)
