"""The TD loss against a plain per-trial, per-step reference, and a hand-checked tiny target."""
import copy

import numpy as np
import pytest
import torch

from mpn_dqn.common.networks import NetSpec, QNetwork
from mpn_dqn.learner.loss import TensorBatch, n_step_targets, td_loss

torch.set_num_threads(1)


def _nets(core="mpn", seed=0, learn=False):
    torch.manual_seed(seed)
    spec = NetSpec(core=core, obs_dim=3, num_actions=3, hidden_dim=12, eta=0.2, lambda_decay=0.9,
                   learn_plasticity=learn)
    online = QNetwork(spec)
    target = copy.deepcopy(online)
    with torch.no_grad():                      # the target differs from the online network
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return spec, online, target


def _trials(spec, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for L in lengths:
        out.append(dict(obs=rng.normal(size=(L, spec.obs_dim)).astype(np.float32),
                        actions=rng.integers(0, spec.num_actions, size=L),
                        rewards=(rng.random(L) < 0.2).astype(np.float32) * rng.choice([-0.1, 1.0], size=L).astype(np.float32),
                        init_state=(0.3 * rng.normal(size=spec.state_size)).astype(np.float32)))
    return out


def _batch(trials):
    B, T = len(trials), max(len(t["actions"]) for t in trials)
    O = trials[0]["obs"].shape[1]
    obs = np.zeros((B, T, O), np.float32)
    act = np.zeros((B, T), np.int64)
    rew = np.zeros((B, T), np.float32)
    mask = np.zeros((B, T), bool)
    for i, t in enumerate(trials):
        L = len(t["actions"])
        obs[i, :L], act[i, :L], rew[i, :L], mask[i, :L] = t["obs"], t["actions"], t["rewards"], True
    init = np.stack([t["init_state"] for t in trials])
    return TensorBatch(obs=torch.from_numpy(obs), actions=torch.from_numpy(act),
                       rewards=torch.from_numpy(rew), mask=torch.from_numpy(mask),
                       init_state=torch.from_numpy(init))


def reference_loss(online, target, trials, gamma, n_step, delta, chunk, cut=False, plain_w=1.0):
    """One trial at a time, one step at a time, batch 1 — the obvious way, written out.
    Each trial's last step weighs 1, its other steps ``plain_w``; the loss is the weighted mean."""
    n_real = sum((len(t["actions"]) - 1) * plain_w + 1 for t in trials)
    total = torch.zeros(())
    for tr in trials:
        L = len(tr["actions"])
        x = torch.from_numpy(tr["obs"])
        s0 = torch.from_numpy(tr["init_state"])[None]
        with torch.no_grad():
            qt, qo = [], []
            s_t, s_o = s0, s0
            for t in range(L):                   # the target net runs its OWN recurrence
                q, s_t = target(x[t][None, None], s_t)
                qt.append(q[0, 0])
                q, s_o = online(x[t][None, None], s_o)
                qo.append(q[0, 0])
        ys = []
        for t in range(L):
            y, k = 0.0, 0
            while k < n_step and t + k < L:
                a_star = int(qo[t + k].argmax())
                if cut and k > 0 and int(tr["actions"][t + k]) != a_star:
                    y += gamma ** k * float(qt[t + k][a_star])     # cut: bootstrap at t+k
                    break
                y += gamma ** k * float(tr["rewards"][t + k])
                k += 1
            else:
                if t + n_step < L:
                    a_star = int(qo[t + n_step].argmax())
                    y += gamma ** n_step * float(qt[t + n_step][a_star])
            ys.append(y)
        s = s0
        for t in range(L):
            if chunk is not None and t % chunk == 0:
                s = s.detach()
            q, s = online(x[t][None, None], s)
            err = q[0, 0, int(tr["actions"][t])] - ys[t]
            a = err.abs()
            h = 0.5 * err ** 2 if a <= delta else delta * (a - 0.5 * delta)
            total = total + (1.0 if t == L - 1 else plain_w) * h / n_real
    return total


@pytest.mark.parametrize("core,chunk,n_step,learn,cut", [
    ("mpn", None, 1, False, False), ("mpn", None, 3, True, False), ("mpn", 4, 3, False, False),
    ("mpn", 5, 1, True, False), ("gru", 4, 2, False, False), ("lstm", None, 2, False, False),
    ("mpn", None, 4, True, True), ("mpn", 4, 6, False, True), ("gru", None, 3, False, True),
    ("mpn", 4, 3, True, 0.1), ("lstm", None, 2, False, 0.25)])
def test_loss_and_gradients_match_reference(core, chunk, n_step, learn, cut):
    """``cut``: False, True (non-greedy cut) or a float (task-time step weight, with the cut)."""
    spec, online, target = _nets(core, learn=learn)
    trials = _trials(spec, [9, 14, 5, 11])
    gamma, delta = 0.9, 1.0
    plain_w = 1.0 if isinstance(cut, bool) else cut
    cut = bool(cut)
    ref = reference_loss(online, target, trials, gamma, n_step, delta, chunk, cut=cut, plain_w=plain_w)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in online.named_parameters()}
    online.zero_grad()
    loss, _ = td_loss(online, target, _batch(trials), gamma=gamma, n_step=n_step,
                      huber_delta=delta, chunk_size=chunk, backward=True, cut_non_greedy=cut,
                      plain_step_weight=plain_w)
    assert float(loss) == pytest.approx(float(ref.detach()), abs=1e-5)
    for n, p in online.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunking_truncates_gradients():
    spec, online, target = _nets("mpn")
    trials = _trials(spec, [20, 20])
    g = {}
    for chunk in (None, 5):
        online.zero_grad()
        td_loss(online, target, _batch(trials), gamma=0.9, n_step=1, chunk_size=chunk, backward=True)
        g[chunk] = online.core.W.grad.clone()
    assert (g[None] - g[5]).abs().max() > 1e-6


def test_tiny_target_by_hand():
    """Two trials, lengths 3 and 2, A = 2, γ = 0.5, n = 2."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.1, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    q_online = torch.tensor([[[1.0, 2.0], [0.0, 5.0], [3.0, 1.0]],
                             [[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    q_target = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]],
                             [[7.0, 8.0], [9.0, 10.0], [99.0, 99.0]]])
    y = n_step_targets(rewards, mask, q_online, q_target, gamma=0.5, n_step=2)
    # trial 0: y0 = r0 + .5 r1 + .25 * Qt(s2, argmax Qo(s2)=0) = 0 + 0 + .25*50
    #          y1 = r1 + .5 r2 (t+2 = 3 = L: no bootstrap) = .5 ; y2 = r2 = 1
    # trial 1: y0 = -.1 + .5*1 (t+2 = L: no bootstrap) = .4 ; y1 = 1 ; padded step = 0
    expected = torch.tensor([[12.5, 0.5, 1.0], [0.4, 1.0, 0.0]])
    torch.testing.assert_close(y, expected)


def test_tiny_target_with_the_non_greedy_cut_by_hand():
    """One trial of length 4, A = 2, γ = 0.5, n = 3; the replayed action at step 2 is not greedy."""
    rewards = torch.tensor([[-0.1, -0.1, -0.1, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    actions = torch.tensor([[1, 0, 1, 1]])
    q_online = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])   # greedy 1, 0, 0, 1
    q_target = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0]]])
    y = n_step_targets(rewards, mask, q_online, q_target, 0.5, 3, actions, cut_non_greedy=True)
    # y0 = r0 + .5 r1 + .25 * Qt(s2, 0)   (step 2's action 1 is not greedy: cut there) = -.15 + 12.5
    # y1 = r1 + .5 * Qt(s2, 0) = -.1 + 25 ;  y2 = r2 + .5 r3 (t+3 = L) = .4 ;  y3 = r3 = 1
    torch.testing.assert_close(y, torch.tensor([[12.35, 24.9, 0.4, 1.0]]))
    # without the cut: y0 = r0 + .5 r1 + .25 r2 + .125 * Qt(s3, 1)
    y_plain = n_step_targets(rewards, mask, q_online, q_target, 0.5, 3)
    assert float(y_plain[0, 0]) == pytest.approx(-0.1 - 0.05 - 0.025 + 10.0)
    with pytest.raises(ValueError, match="actions"):
        n_step_targets(rewards, mask, q_online, q_target, 0.5, 3, cut_non_greedy=True)


def test_target_net_uses_its_own_state_not_the_online_state():
    """Feeding the target network the online network's states would give other targets."""
    spec, online, target = _nets("mpn")
    trials = _trials(spec, [12])
    b = _batch(trials)
    with torch.no_grad():
        q_on, _ = online(b.obs, b.init_state)
        q_tg, _ = target(b.obs, b.init_state)
        y = n_step_targets(b.rewards, b.mask, q_on, q_tg, 0.9, 1)
        # wrong: target head applied to the online core's hidden activity
        h_on, _ = online.core(b.obs, b.init_state)
        q_wrong = target.q_values(h_on)
        y_wrong = n_step_targets(b.rewards, b.mask, q_on, q_wrong, 0.9, 1)
    loss, _ = td_loss(online, target, b, gamma=0.9, n_step=1)
    assert not torch.allclose(y, y_wrong)
    ref = reference_loss(online, target, trials, 0.9, 1, 1.0, None)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-6)


class _SavedBytes:
    """Tracks bytes of tensors saved for backward that are alive (peak over the run)."""

    def __init__(self):
        self.alive = 0
        self.peak = 0

    def __enter__(self):
        tracker = self

        class Box:
            def __init__(self, t):
                self.t = t
                self.n = t.numel() * t.element_size()
                tracker.alive += self.n
                tracker.peak = max(tracker.peak, tracker.alive)

            def __del__(self):
                tracker.alive -= self.n

        self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: Box(t), lambda box: box.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_peak_autograd_memory_falls_with_chunk_size():
    spec, online, target = _nets("mpn")
    trials = _trials(spec, [120] * 4)
    peaks = {}
    for chunk in (None, 30, 10):
        online.zero_grad()
        with _SavedBytes() as sb:
            td_loss(online, target, _batch(trials), gamma=0.9, n_step=1, chunk_size=chunk, backward=True)
        peaks[chunk] = sb.peak
    assert peaks[30] < 0.4 * peaks[None]
    assert peaks[10] < 0.5 * peaks[30]


def test_padding_the_time_axis_leaves_loss_and_gradients_unchanged():
    """The GPU path pads batches to bucketed lengths; masked padding must not change anything."""
    from mpn_dqn.learner.learner import pad_time
    spec, online, target = _nets("mpn", learn=True)
    b = _batch(_trials(spec, [9, 14, 5]))
    grads = []
    for tb in (b, pad_time(b, 32)):
        online.zero_grad()
        loss, _ = td_loss(online, target, tb, gamma=0.9, n_step=3, backward=True)
        grads.append((float(loss), [p.grad.clone() for p in online.parameters()]))
    assert pad_time(b, 32).obs.shape[1] == 32
    # buckets: within 12.5 % of T (within min_step for short T), a few lengths per doubling
    from mpn_dqn.learner.learner import bucket_length
    lengths = {bucket_length(T) for T in range(1, 1025)}
    assert all(T <= bucket_length(T) < max(T + 8, 1.125 * T) for T in range(1, 1025))
    assert [bucket_length(T) for T in (5, 40, 100, 465)] == [8, 40, 104, 480]
    assert len(lengths) <= 8 * 7 + 8
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_cuda_graphs_refused_without_cuda():
    from mpn_dqn.learner.learner import DeviceError, Learner
    spec = NetSpec(core="mpn", obs_dim=3, num_actions=3, hidden_dim=8)
    with pytest.raises(DeviceError):          # a CPU learner refuses graphs, GPU present or not
        Learner(spec, gamma=0.9, device="cpu", cuda_graphs=True)
    assert Learner(spec, gamma=0.9, device="cpu").use_graphs is False


def test_step_weights_put_each_trial_outcome_at_one():
    from mpn_dqn.learner.loss import step_weights
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    torch.testing.assert_close(step_weights(mask, 0.1),
                               torch.tensor([[0.1, 0.1, 0.1, 1.0], [0.1, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(step_weights(mask, 1.0), mask.float())   # dt 100: uniform


def test_task_time_weighting_is_the_plain_mean_at_dt_100():
    from mpn_dqn.common.config import TrainConfig
    assert TrainConfig(env_name="PerceptualDecisionMaking-v0", dt=100).effective_plain_step_weight == 1.0
    assert TrainConfig(env_name="PerceptualDecisionMaking-v0", dt=10).effective_plain_step_weight == 0.1
    assert TrainConfig(env_name="PerceptualDecisionMaking-v0", dt=10,
                       td_step_weighting="uniform").effective_plain_step_weight == 1.0
