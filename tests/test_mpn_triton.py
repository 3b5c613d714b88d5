"""The Triton MPN scan (common/mpn_triton.py) against the torch scan, on the CPU.

The kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), which must be set before
Triton compiles anything, so each check runs in a fresh interpreter process.  The same kernels
were run on an H200 by ``tests/benchmarks/bench_learner_gpu.py`` (gradients against the CPU in
float64 there too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(__file__), "..")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from mpn_dqn.common import mpn_triton
    from mpn_dqn.common.mpn import MPNScan, MPNScanTriton, MPNCore, _use_triton_kernels
    B, T, I, H = (int(v) for v in sys.argv[1:5])
    g = torch.Generator().manual_seed(B * 1000 + H)
    ref = [torch.randn(B, T, I, generator=g, dtype=torch.float64),
           0.3 * torch.randn(B, I, H, generator=g, dtype=torch.float64),
           torch.randn(I, H, generator=g, dtype=torch.float64) / 2,
           0.1 * torch.randn(H, generator=g, dtype=torch.float64),
           0.4 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64),     # η and λ per unit
           0.9 - 0.1 * torch.rand(H, generator=g, dtype=torch.float64)]
    ref = [t.requires_grad_(True) for t in ref]
    tri = [t.detach().float().requires_grad_(True) for t in ref]
    g_h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    g_M = torch.randn(B, I, H, generator=g, dtype=torch.float64)
    h, MT = MPNScan.apply(*ref)
    ((h * g_h).sum() + (MT * g_M).sum()).backward()
    h2, MT2 = MPNScanTriton.apply(*tri)
    ((h2 * g_h.float()).sum() + (MT2 * g_M.float()).sum()).backward()
    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-12))
    out = {"h": rel(h2, h), "M_T": rel(MT2, MT)}
    for name, a, r in zip(["x", "M0", "Wt", "b", "eta", "lam"], tri, ref):
        if name != "x":
            out["grad_" + name] = rel(a.grad, r.grad)
    with torch.no_grad():
        h3, MT3, Ms = mpn_triton.scan_forward(*[t.detach() for t in tri], keep_states=False)
    out["nograd_h"], out["nograd_M_T"] = rel(h3, h), rel(MT3, MT)
    out["nograd_keeps_no_states"] = Ms is None
    out["dispatch_float32"] = _use_triton_kernels(tri[0])
    out["dispatch_float64"] = _use_triton_kernels(ref[0])
    print(json.dumps(out))
""")


def run_interpreted(B, T, I, H):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(B), str(T), str(I), str(H)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("B,T,I,H", [
    (3, 7, 6, 20),      # H not a power of two: masked lanes
    (2, 5, 4, 150),     # two blocks of hidden units
    (1, 1, 2, 16),      # one step
])
def test_triton_scan_matches_torch_scan(B, T, I, H):
    out = run_interpreted(B, T, I, H)
    errs = {k: v for k, v in out.items() if not isinstance(v, bool)}
    # float32 kernels against float64: relative to the largest value of each output / gradient
    assert max(errs.values()) < 1e-5, errs
    assert out["nograd_keeps_no_states"] is True
    assert out["dispatch_float32"] is True and out["dispatch_float64"] is False


def test_triton_scan_rejects_too_many_inputs():
    import torch
    from mpn_dqn.common import mpn_triton
    x = torch.zeros(1, 2, mpn_triton.MAX_IN_DIM + 1)
    with pytest.raises(ValueError, match="at most"):
        mpn_triton.scan_forward(x, torch.zeros(1, x.shape[-1], 8), torch.zeros(x.shape[-1], 8),
                                torch.zeros(8), torch.tensor(0.1), torch.tensor(0.9), keep_states=False)
