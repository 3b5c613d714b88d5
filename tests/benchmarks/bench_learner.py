"""Learner benchmark: trial-steps/s of one TD update (loss + backward + Adam step).

Batched, masked learner (``learner.Learner``) against a faithful re-implementation of the old
loop (one trial at a time, batch 1, one Python call per step) measured in the same run, on
B=32 trials x T=100 steps, H=128, obs 5, 3 actions.  Imports only torch and the learner core
(no Ray, no NeuroGym), so it also runs on a GPU machine.

    python tests/benchmarks/bench_learner.py [--repeats 5] [--device cpu|cuda]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from mpn_dqn.common.networks import NetSpec, QNetwork  # noqa: E402
from mpn_dqn.learner.learner import Learner  # noqa: E402
from mpn_dqn.learner.loss import TensorBatch  # noqa: E402


def make_batch(B, T, O, A, S, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, O, generator=g)
    actions = torch.randint(0, A, (B, T), generator=g)
    rewards = (torch.rand(B, T, generator=g) < 0.05).float()
    mask = torch.ones(B, T, dtype=torch.bool)
    init = 0.1 * torch.randn(B, S, generator=g)
    return TensorBatch(obs=obs.to(device), actions=actions.to(device), rewards=rewards.to(device),
                       mask=mask.to(device), init_state=init.to(device))


def old_loop_update(online: QNetwork, target: QNetwork, opt, batch: TensorBatch, gamma: float):
    """The old trainer: for each trial, for each step, a batch-1 forward; 1-step double DQN."""
    opt.zero_grad()
    B, T, _ = batch.obs.shape
    total = 0.0
    for b in range(B):
        s_on = batch.init_state[b:b + 1]
        with torch.no_grad():
            s_tg = s_on
            q_next_t, q_next_o = [], []
            s_o2 = s_on
            for t in range(T):
                q, s_tg = target(batch.obs[b:b + 1, t:t + 1], s_tg)
                q_next_t.append(q[0, 0])
                q, s_o2 = online(batch.obs[b:b + 1, t:t + 1], s_o2)
                q_next_o.append(q[0, 0])
        loss = 0.0
        for t in range(T):
            q, s_on = online(batch.obs[b:b + 1, t:t + 1], s_on)
            y = batch.rewards[b, t]
            if t + 1 < T:
                y = y + gamma * q_next_t[t + 1][q_next_o[t + 1].argmax()]
            loss = loss + torch.nn.functional.smooth_l1_loss(q[0, 0, batch.actions[b, t]], y)
        (loss / (B * T)).backward()
        total += float(loss.detach())
    opt.step()
    return total


def check_gradients(spec, device, B=16, T=100) -> float:
    """Max |grad(device, float32) - grad(CPU, float64)| of the TD loss, same weights and batch."""
    from mpn_dqn.learner.loss import td_loss
    torch.manual_seed(0)
    ref = QNetwork(spec).double()
    tgt = QNetwork(spec).double()
    b64 = make_batch(B, T, spec.obs_dim, spec.num_actions, spec.state_size, torch.device("cpu"))
    b64 = TensorBatch(obs=b64.obs.double(), actions=b64.actions, rewards=b64.rewards.double(),
                      mask=b64.mask, init_state=b64.init_state.double())
    td_loss(ref, tgt, b64, gamma=0.99, n_step=1, backward=True)
    dev_net, dev_tgt = QNetwork(spec).to(device), QNetwork(spec).to(device)
    dev_net.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    dev_tgt.load_state_dict({k: v.float() for k, v in tgt.state_dict().items()})
    bd = TensorBatch(obs=b64.obs.float().to(device), actions=b64.actions.to(device),
                     rewards=b64.rewards.float().to(device), mask=b64.mask.to(device),
                     init_state=b64.init_state.float().to(device))
    td_loss(dev_net, dev_tgt, bd, gamma=0.99, n_step=1, backward=True)
    err = max(float((p.grad.double().cpu() - r.grad).abs().max())
              for p, r in zip(dev_net.parameters(), ref.parameters()))
    print(f"gradient check vs CPU float64: max abs error {err:.2e}")
    return err


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, repeats, device, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--no-graphs", action="store_true", help="on CUDA: eager updates instead of CUDA graphs")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="skip the old loop (it takes minutes at large B on a GPU); report 0 for it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    B, T, H, O, A = args.batch, args.steps, args.hidden, 5, 3
    spec = NetSpec(core="mpn", obs_dim=O, num_actions=A, hidden_dim=H)
    learner = Learner(spec, gamma=0.99, n_step=1, device=args.device, chunk_size=None,
                      cuda_graphs=False if args.no_graphs else None)
    batch = make_batch(B, T, O, A, spec.state_size, device)
    grad_err = check_gradients(spec, device) if device.type != "cpu" else 0.0
    fast = time_it(lambda: learner.update(batch), args.repeats, device, warmup=5)
    if args.skip_baseline:
        steps = B * T
        rate = steps / statistics.median(fast)
        print(f"batched learner : median {statistics.median(fast) * 1e3:8.2f} ms/update -> {rate:12.0f} trial-steps/s")
        print(json.dumps({"benchmark": "learner", "device": str(device), "B": B, "T": T, "H": H,
                          "cuda_graphs": learner.use_graphs, "trial_steps_per_s": round(rate),
                          "baseline_trial_steps_per_s": 0, "speedup": None,
                          "max_grad_abs_err_vs_cpu_float64": grad_err}))
        return
    old_online = QNetwork(spec).to(device)
    old_target = QNetwork(spec).to(device)
    for net in (old_online, old_target):      # the old system's per-step torch MPN (no fused scan)
        net.core.use_scan = False
    opt = torch.optim.Adam(old_online.parameters(), lr=1e-3)
    slow = time_it(lambda: old_loop_update(old_online, old_target, opt, batch, 0.99),
                   args.baseline_repeats, device, warmup=0)
    steps = B * T
    rate, base = steps / statistics.median(fast), steps / statistics.median(slow)
    print(f"batched learner : median {statistics.median(fast) * 1e3:8.1f} ms/update "
          f"-> {rate:10.0f} trial-steps/s  (runs: {[round(x * 1e3, 1) for x in fast]})")
    print(f"old per-step loop: median {statistics.median(slow) * 1e3:8.1f} ms/update "
          f"-> {base:10.0f} trial-steps/s  (runs: {[round(x * 1e3, 1) for x in slow]})")
    print(f"speedup {rate / base:.1f}x")
    print(json.dumps({"benchmark": "learner", "device": str(device), "B": B, "T": T, "H": H,
                      "cuda_graphs": learner.use_graphs, "trial_steps_per_s": round(rate),
                      "baseline_trial_steps_per_s": round(base), "speedup": round(rate / base, 2),
                      "max_grad_abs_err_vs_cpu_float64": grad_err}))


if __name__ == "__main__":
    main()
