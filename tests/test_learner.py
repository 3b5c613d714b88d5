"""The Learner around the TD loss: target updates, the start state replay uses, burn-in.

* a hard target is the online net copied every ``target_update_period`` updates and unchanged
  between; a Polyak target moves τ of the way to the online net after every update;
* ``replay_init zero`` ignores the state a trial was stored with, ``stored`` uses it;
* burn-in runs each network over the preceding steps without gradient (padded steps leave the
  state alone) and the loss is then the loss from the state that burn-in reached.
"""
import copy

import numpy as np
import pytest
import torch

from mpn_dqn.common.networks import NetSpec, QNetwork
from mpn_dqn.learner.learner import Learner
from mpn_dqn.learner.loss import TensorBatch, td_loss
from mpn_dqn.replay.buffer import TrialBatch

torch.set_num_threads(1)
SPEC = NetSpec(core="mpn", obs_dim=3, num_actions=3, hidden_dim=8, eta=0.2, lambda_decay=0.9,
               learn_plasticity=True)


def _batch(seed=0, B=4, T=6, N=0, spec=SPEC) -> TrialBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    burnin_mask = np.zeros((B, N), bool)
    for b in range(B):                                   # right-aligned; odd rows half as long
        burnin_mask[b, N - (N if b % 2 == 0 else N // 2):] = True
    f = np.float32
    return TrialBatch(obs=rng.normal(size=(B, T, spec.obs_dim)).astype(f) * mask[..., None],
                      actions=rng.integers(0, spec.num_actions, size=(B, T)) * mask,
                      rewards=(rng.random((B, T)) < 0.3).astype(f) * mask, mask=mask, lengths=lengths,
                      init_state=(0.3 * rng.normal(size=(B, spec.state_size))).astype(f),
                      burnin_obs=rng.normal(size=(B, N, spec.obs_dim)).astype(f) * burnin_mask[..., None],
                      burnin_mask=burnin_mask,
                      burnin_state=(0.3 * rng.normal(size=(B, spec.state_size if N else 0))).astype(f))


def _params(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_a_hard_target_is_the_online_net_copied_every_period_and_unchanged_between():
    lr = Learner(SPEC, gamma=0.9, n_step=2, target_update="hard", target_update_period=3)
    start = _params(lr.target)
    for i in (1, 2):
        lr.update(_batch(i))
        assert all(torch.equal(a, b) for a, b in zip(start, _params(lr.target))), f"moved after update {i}"
    assert not all(torch.equal(a, b) for a, b in zip(start, _params(lr.online)))
    lr.update(_batch(3))
    assert all(torch.equal(a, b) for a, b in zip(_params(lr.online), _params(lr.target)))


def test_a_polyak_target_moves_tau_of_the_way_to_the_online_net_after_every_update():
    tau = 0.1
    lr = Learner(SPEC, gamma=0.9, n_step=2, target_update="polyak", polyak_tau=tau)
    for i in range(3):
        before = _params(lr.target)
        lr.update(_batch(i))
        online = _params(lr.online)
        assert not all(torch.equal(a, b) for a, b in zip(before, online))
        for old, new, o in zip(before, _params(lr.target), online):
            torch.testing.assert_close(new, (1 - tau) * old + tau * o, rtol=0, atol=1e-7)


@pytest.mark.parametrize("replay_init,same", [("zero", True), ("stored", False)])
def test_zero_replay_ignores_the_stored_state_and_stored_replay_uses_it(replay_init, same):
    a = _batch(0)
    b = copy.deepcopy(a)
    b.init_state = (b.init_state + 0.5).astype(np.float32)         # only the stored state differs
    learners = [Learner(SPEC, gamma=0.9, n_step=2, replay_init=replay_init, seed=7) for _ in (a, b)]
    if replay_init == "zero":
        assert not learners[0].to_tensors(a).init_state.any()
    for lr, batch in zip(learners, (a, b)):
        lr.update(batch)
    equal = all(torch.equal(p, q) for p, q in zip(_params(learners[0].online), _params(learners[1].online)))
    assert equal is same


def test_burn_in_starts_the_loss_where_the_burn_in_ended_and_carries_no_gradient():
    torch.manual_seed(0)
    online = QNetwork(SPEC)
    target = copy.deepcopy(online)                 # equal nets: one burn-in state for both
    lr = Learner(SPEC, gamma=0.9, n_step=3, replay_init="burn-in")
    batch = _batch(1, N=4)
    tb = lr.to_tensors(batch)
    assert tb.burnin_obs is not None and tb.burnin_obs.shape[1] == 4
    assert not tb.burnin_mask[1].all() and tb.burnin_mask[0].all()   # row 1: a shorter burn-in

    # the state burn-in reaches, each trial by hand over its real burn-in steps only
    reached = []
    for b in range(tb.obs.shape[0]):
        real = tb.burnin_mask[b]
        with torch.no_grad():
            _, s = online(tb.burnin_obs[b:b + 1, real], tb.burnin_state[b:b + 1])
        reached.append(s[0])
    plain = TensorBatch(obs=tb.obs, actions=tb.actions, rewards=tb.rewards, mask=tb.mask,
                        init_state=torch.stack(reached))

    grads = []
    for batch_ in (tb, plain):
        online.zero_grad()
        loss, _ = td_loss(online, target, batch_, gamma=0.9, n_step=3, backward=True)
        grads.append((float(loss), [p.grad.clone() for p in online.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)
    # and the burn-in mattered: from the stored state the loss is another one
    stored = TensorBatch(obs=tb.obs, actions=tb.actions, rewards=tb.rewards, mask=tb.mask,
                         init_state=tb.init_state)
    assert float(td_loss(online, target, stored, gamma=0.9, n_step=3)[0].detach()) != pytest.approx(grads[0][0], rel=1e-4)
