"""GPU learner benchmark: one prepared run that verifies and times the CUDA path.

Imports only torch (+ Triton when present) and the learner core — no Ray, no NeuroGym — so it
runs on a bare GPU machine.  In one run it:

1. checks gradients of the TD loss on the GPU (float32) against the CPU in float64, for the
   fused Triton scan and for the eager torch scan, with the training defaults' loss (n-step 5,
   non-greedy cut, task-time step weights at dt 10);
2. checks that a CUDA-graphed update gives the same weights as eager updates (5 updates);
3. times one TD update (both recurrences + loss + backward + clip + Adam) at B=1024 and 4096,
   T=100, H=128: Triton scan in a CUDA graph (what the learner uses on a GPU), torch scan in a
   CUDA graph, Triton scan without graphs;
   (graphed updates pad T to a multiple of 32 — fixed shapes — so T=100 runs as 128; the rates
   count real trial-steps only);
4. times the old per-step loop (batch 1, one Python call per step) on the same GPU as the
   baseline, at B=32 (per trial-step it does not depend on B, and B=1024 would take minutes).

    python tests/benchmarks/bench_learner_gpu.py [--repeats 20] [--batches 1024 4096]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_learner import make_batch, old_loop_update  # noqa: E402
from mpn_dqn.common import mpn_triton  # noqa: E402
from mpn_dqn.common.mpn import MPNCore  # noqa: E402
from mpn_dqn.common.networks import NetSpec, QNetwork  # noqa: E402
from mpn_dqn.learner.learner import Learner  # noqa: E402
from mpn_dqn.learner.loss import TensorBatch, td_loss  # noqa: E402

LOSS = dict(gamma=0.99, n_step=5, cut_non_greedy=True, plain_step_weight=0.1)


def spec_for(H, learn=True):
    return NetSpec(core="mpn", obs_dim=5, num_actions=3, hidden_dim=H, learn_plasticity=learn)


def grad_check(H, use_triton: bool, B=64, T=100) -> float:
    """max |∂(GPU float32) - ∂(CPU float64)| / max |∂(CPU float64)| over all parameters."""
    spec = spec_for(H)
    torch.manual_seed(0)
    ref, tgt = QNetwork(spec).double(), QNetwork(spec).double()
    cpu = make_batch(B, T, 5, 3, spec.state_size, torch.device("cpu"), seed=1)
    b64 = TensorBatch(obs=cpu.obs.double(), actions=cpu.actions, rewards=cpu.rewards.double(),
                      mask=cpu.mask.clone(), init_state=cpu.init_state.double())
    b64.mask[: B // 2, T - T // 3:] = False                  # variable trial lengths
    MPNCore.use_cpu_kernels = False
    td_loss(ref, tgt, b64, backward=True, **LOSS)
    MPNCore.use_cpu_kernels = True
    net, tnet = QNetwork(spec).cuda(), QNetwork(spec).cuda()
    net.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    tnet.load_state_dict({k: v.float() for k, v in tgt.state_dict().items()})
    bd = TensorBatch(obs=b64.obs.float().cuda(), actions=b64.actions.cuda(), rewards=b64.rewards.float().cuda(),
                     mask=b64.mask.cuda(), init_state=b64.init_state.float().cuda())
    MPNCore.use_gpu_kernels = use_triton
    td_loss(net, tnet, bd, backward=True, **LOSS)
    MPNCore.use_gpu_kernels = True
    scale = max(float(r.grad.abs().max()) for r in ref.parameters())
    return max(float((p.grad.double().cpu() - r.grad).abs().max()) for p, r in zip(net.parameters(), ref.parameters())) / scale


def graph_check(H, B=256, T=100, updates=5) -> float:
    """max |w(graphed) - w(eager)| after ``updates`` updates from the same weights and batches."""
    spec = spec_for(H)
    kw = dict(gamma=0.99, n_step=5, n_step_cut="non-greedy", plain_step_weight=0.1, device="cuda", seed=0)
    eager, graphed = Learner(spec, cuda_graphs=False, **kw), Learner(spec, cuda_graphs=True, **kw)
    graphed.online.load_state_dict(eager.online.state_dict())
    graphed.target.load_state_dict(eager.target.state_dict())
    for i in range(updates):
        batch = make_batch(B, T, 5, 3, spec.state_size, torch.device("cuda"), seed=10 + i)
        eager.update(batch)
        graphed.update(batch)
    torch.cuda.synchronize()
    return max(float((a - b).detach().abs().max()) for a, b in zip(eager.online.parameters(), graphed.online.parameters()))


def time_updates(B, T, H, repeats, graphs: bool, use_triton: bool, chunk: int | None = None) -> float:
    """Median seconds per update (each repeat times 10 updates)."""
    MPNCore.use_gpu_kernels = use_triton
    spec = spec_for(H)
    learner = Learner(spec, gamma=0.99, n_step=5, n_step_cut="non-greedy", plain_step_weight=0.1,
                      device="cuda", cuda_graphs=graphs, chunk_size=chunk)
    batch = make_batch(B, T, 5, 3, spec.state_size, torch.device("cuda"))
    for _ in range(6):
        learner.update(batch)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            learner.update(batch)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / 10)
    MPNCore.use_gpu_kernels = True
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--train-shapes", type=lambda v: tuple(int(x) if x != "none" else None for x in v.split(",")),
                    nargs="*", default=[(32, 32, None), (256, 32, None), (32, 480, 40), (256, 480, 40)],
                    help="B,T,chunk of update shapes met in training (chunk 'none': whole trials)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU machine (bench_learner.py measures the CPU)")
    T, H = args.steps, args.hidden
    triton_ok = mpn_triton.available(torch.device("cuda"))
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {getattr(mpn_triton.triton, '__version__', None)}")
    res = {"benchmark": "learner_gpu", "device": torch.cuda.get_device_name(), "T": T, "H": H,
           "torch": torch.__version__, "triton": triton_ok}

    def check(key, what, fn):      # one failing check is reported, not fatal: the run is precious
        try:
            res[key] = fn()
            print(f"{what}: {res[key]:.2e}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res[key] = f"error: {type(e).__name__}: {e}"

    check("grad_rel_err_torch_scan", "gradients vs CPU float64, torch scan (relative to the largest)",
          lambda: grad_check(H, use_triton=False))
    if triton_ok:
        check("grad_rel_err_triton_scan", "gradients vs CPU float64, triton scan (relative to the largest)",
              lambda: grad_check(H, use_triton=True))
    check("graph_vs_eager_max_weight_diff", "CUDA graph vs eager, weights after 5 updates: max abs diff",
          lambda: graph_check(H))

    variants = [("graph+triton", True, True), ("graph+torch", True, False), ("eager+triton", False, True)]
    if not triton_ok:
        variants = [("graph+torch", True, False), ("eager+torch", False, False)]
    rates = {}
    for B in args.batches:
        for name, graphs, tri in variants:
            try:
                sec = time_updates(B, T, H, args.repeats, graphs, tri)
            except torch.cuda.OutOfMemoryError:
                print(f"B={B:5d} {name:13s}: out of memory")
                torch.cuda.empty_cache()
                continue
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                continue
            rates[f"{name}@B{B}"] = round(B * T / sec)
            print(f"B={B:5d} {name:13s}: {sec * 1e3:8.3f} ms/update -> {B * T / sec / 1e6:8.2f} M trial-steps/s")
    # training shapes: dt 100 trials (T ~ 20-30, padded to 32) and dt 10 trials in BPTT chunks of 40
    for B, T2, chunk in args.train_shapes:
        try:
            sec = time_updates(B, T2, H, args.repeats, True, triton_ok, chunk)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            continue
        key = f"train-shape B{B} T{T2} chunk{chunk}"
        rates[key] = round(B * T2 / sec)
        print(f"{key:30s}: {sec * 1e3:8.3f} ms/update -> {B * T2 / sec / 1e6:8.2f} M trial-steps/s")
    # baseline: the old per-step loop on this GPU (B=32; its rate per trial-step does not depend on B)
    spec = spec_for(H, learn=False)
    online, target = QNetwork(spec).cuda(), QNetwork(spec).cuda()
    for net in (online, target):
        net.core.use_scan = False
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    batch = make_batch(32, T, 5, 3, spec.state_size, torch.device("cuda"))
    old_loop_update(online, target, opt, batch, 0.99)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    old_loop_update(online, target, opt, batch, 0.99)
    torch.cuda.synchronize()
    base = 32 * T / (time.perf_counter() - t0)
    print(f"old per-step loop (B=32): {base:10.0f} trial-steps/s")
    res["baseline_trial_steps_per_s"] = round(base)
    res["trial_steps_per_s"] = rates
    best_key = max((k for k in rates if "@" in k), key=rates.get, default=None)
    res["best"] = best_key
    res["speedup_best_vs_baseline"] = round(rates[best_key] / base, 1) if best_key else None
    if best_key:
        print(f"best {best_key}: {rates[best_key] / 1e6:.2f} M trial-steps/s = {rates[best_key] / base:.0f}x the old loop")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
