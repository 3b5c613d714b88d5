"""The MPN and the other cores: torch and numpy agree, and the network can read M at x = 0."""
import math
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch

from mpn_dqn.common.mpn import MPNCore, mpn_step_numpy
from mpn_dqn.common.networks import NetSpec, NumpyPolicy, QNetwork, export_params

torch.set_num_threads(1)


def _random_net(spec: NetSpec, seed: int = 0) -> QNetwork:
    torch.manual_seed(seed)
    net = QNetwork(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("actor_kernel", ["numba", "numpy"])
@pytest.mark.parametrize("core,learn,dueling,time_scale,bias,per_unit", [
    ("mpn", False, False, 1.0, 1.0, False), ("mpn", True, True, 1.0, 1.0, False),
    ("mpn", True, False, 0.1, 1.0, False), ("mpn", False, False, 1.0, 0.0, False),
    ("mpn", True, False, 1.0, 1.0, True), ("gru", False, False, 1.0, 1.0, False),
    ("lstm", False, True, 1.0, 1.0, False)])
def test_torch_and_numpy_agree_with_episode_resets(core, learn, dueling, time_scale, bias, per_unit,
                                                   actor_kernel, monkeypatch):
    import mpn_dqn.common.networks as networks
    if actor_kernel == "numpy":
        monkeypatch.setattr(networks.NumpyPolicy, "use_kernel", False)
    spec = NetSpec(core=core, obs_dim=4, num_actions=3, hidden_dim=16, eta=0.3, lambda_decay=0.9,
                   learn_plasticity=learn, lambda_max=0.95, dueling=dueling, time_scale=time_scale,
                   input_bias=bias, plasticity_per_unit=per_unit)
    net = _random_net(spec)
    rng = np.random.default_rng(1)
    K, T = 5, 40
    obs = rng.normal(size=(K, T, 4)).astype(np.float32)
    obs[:, 10:14] = 0.0                                   # zero observations, as at decision time
    reset = rng.random((K, T)) < 0.08                     # episode boundaries at random steps
    with torch.no_grad():
        q_torch, _ = net(torch.from_numpy(obs), net.initial_state(K), reset=torch.from_numpy(reset))
    pol = NumpyPolicy(spec, export_params(net))
    state = np.zeros((K, spec.state_size), np.float32)
    q_np = np.zeros((K, T, 3), np.float32)
    for t in range(T):
        state[reset[:, t]] = 0.0
        q_np[:, t] = pol.step(obs[:, t], state)
    np.testing.assert_allclose(q_np, q_torch.numpy(), atol=1e-5, rtol=0)


def test_step_matches_the_formula_written_out():
    """h = tanh(b + (W ⊙ (1 + M)) x̃),  M' = λ M + η h x̃ᵀ  — checked elementwise, M stored [I,H]."""
    rng = np.random.default_rng(0)
    I, H = 3, 4
    W = rng.normal(size=(H, I)).astype(np.float32)
    b = rng.normal(size=H).astype(np.float32)
    M_hi = rng.normal(size=(H, I)).astype(np.float32)          # the paper's layout
    x = rng.normal(size=I).astype(np.float32)
    eta, lam = 0.2, 0.7
    h_ref = np.tanh(b + (W * (1 + M_hi)) @ x)
    M_ref = lam * M_hi + eta * np.outer(h_ref, x)
    M = np.ascontiguousarray(M_hi.T)[None].copy()              # stored [1, I, H]
    h = mpn_step_numpy(x[None], M, np.ascontiguousarray(W.T), b, eta, lam)
    np.testing.assert_allclose(h[0], h_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(M[0].T, M_ref, rtol=1e-5, atol=1e-6)


def _q_at_zero_after(net: QNetwork, stimulus: np.ndarray, zeros: int = 3) -> np.ndarray:
    seq = np.concatenate([stimulus, np.zeros((zeros, stimulus.shape[1]), np.float32)])[None]
    with torch.no_grad():
        q, _ = net(torch.from_numpy(seq), net.initial_state(1))
    return q[0, -1].numpy()


def test_q_at_zero_observation_depends_on_earlier_stimulus():
    spec = NetSpec(core="mpn", obs_dim=3, num_actions=3, hidden_dim=32, input_bias=1.0)
    net = _random_net(spec)
    left = np.tile(np.array([[1.0, 1.0, 0.0]], np.float32), (5, 1))
    right = np.tile(np.array([[1.0, 0.0, 1.0]], np.float32), (5, 1))
    diff = np.abs(_q_at_zero_after(net, left) - _q_at_zero_after(net, right)).max()
    assert diff > 1e-3, "with the constant channel, M must be readable at a zero observation"


def test_without_constant_channel_the_network_is_blind_at_zero_observation():
    spec = NetSpec(core="mpn", obs_dim=3, num_actions=3, hidden_dim=32, input_bias=0.0)
    net = _random_net(spec)
    left = np.tile(np.array([[1.0, 1.0, 0.0]], np.float32), (5, 1))
    right = np.tile(np.array([[1.0, 0.0, 1.0]], np.float32), (5, 1))
    np.testing.assert_array_equal(_q_at_zero_after(net, left), _q_at_zero_after(net, right))


def test_learnable_lambda_is_projected_into_range_and_eta_may_be_negative():
    core = MPNCore(3, 8, eta_per_step=-0.5, lambda_per_step=0.9, learn_plasticity=True,
                   lambda_max_per_step=0.95)
    eta, lam = core.plasticity()
    assert float(eta.detach()[0]) == pytest.approx(-0.5)
    assert float(lam.detach()[0]) == pytest.approx(0.9)
    for logit in (50.0, -50.0):                     # as if an optimiser step had gone far out
        with torch.no_grad():
            core.lambda_logit_per_100ms.fill_(logit)
        core.project_()
        assert 0.0 <= float(core.plasticity()[1].detach()[0]) <= 0.95 + 1e-6
    # an initial λ above the bound starts on it
    high = MPNCore(3, 8, lambda_per_step=0.99, learn_plasticity=True, lambda_max_per_step=0.95)
    assert float(high.plasticity()[1].detach()[0]) == pytest.approx(0.95, rel=1e-6)
    assert {n for n, _ in core.named_parameters()} == {"W", "b", "eta_per_100ms", "lambda_logit_per_100ms"}


def test_fixed_plasticity_is_not_a_parameter_and_has_the_same_units():
    core = MPNCore(3, 8, eta_per_step=0.1, lambda_per_step=0.95)
    assert {n for n, _ in core.named_parameters()} == {"W", "b"}
    eta, lam = core.plasticity()
    assert float(eta[0]) == pytest.approx(0.1) and float(lam[0]) == pytest.approx(0.95)
    fine = MPNCore(3, 8, eta_per_step=0.01, lambda_per_step=0.95 ** 0.1, time_scale=0.1)
    assert float(fine.eta_per_100ms) == pytest.approx(float(core.eta_per_100ms))
    assert float(fine.lambda_logit_per_100ms) == pytest.approx(float(core.lambda_logit_per_100ms), rel=1e-5)
    for lam in (0.0, 1.0):                           # no decay / no memory, exactly
        assert float(MPNCore(3, 8, lambda_per_step=lam, time_scale=0.1).plasticity()[1][0]) == lam


@pytest.mark.parametrize("learn", [False, True])
def test_a_checkpoint_with_the_old_parameter_names_loads_with_the_same_eta_and_lambda(learn):
    """Checkpoints stored ``eta_param`` / ``lambda_logit``: learned, per 100 ms (η, the logit of
    λ); fixed, η and λ per step.  They load as the same η and λ per step."""
    core = MPNCore(3, 8, eta_per_step=0.04, lambda_per_step=0.99, learn_plasticity=learn,
                   lambda_max_per_step=0.999, time_scale=0.1)
    sd = core.state_dict()
    eta, lam = (float(v.detach()[0]) for v in core.plasticity())
    if learn:
        old = {"eta_param": sd["eta_per_100ms"], "lambda_logit": sd["lambda_logit_per_100ms"]}
    else:
        old = {"eta_param": torch.tensor(eta), "lambda_logit": torch.tensor(lam)}
    other = MPNCore(3, 8, eta_per_step=0.3, lambda_per_step=0.5, learn_plasticity=learn,
                    lambda_max_per_step=0.999, time_scale=0.1)
    other.load_state_dict({"W": sd["W"], "b": sd["b"], **old})
    e2, l2 = (float(v.detach()[0]) for v in other.plasticity())
    assert e2 == pytest.approx(eta, rel=1e-6) and l2 == pytest.approx(lam, rel=1e-6)


def test_masked_steps_leave_the_state_unchanged():
    spec = NetSpec(core="mpn", obs_dim=2, num_actions=2, hidden_dim=8)
    net = _random_net(spec)
    x = torch.randn(2, 6, 2)
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    s0 = torch.randn(2, spec.state_size) * 0.1
    with torch.no_grad():
        _, s_masked = net(x, s0, mask=mask)
        _, s_tail = net(x[:1, 2:], s0[:1])
    torch.testing.assert_close(s_masked[:1], s_tail, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("learn,per_unit", [(False, False), (True, False), (True, True)])
def test_fused_scan_matches_the_step_loop_in_value_and_gradient(learn, per_unit):
    torch.manual_seed(0)
    core = MPNCore(3, 10, eta_per_step=0.3, lambda_per_step=0.8, learn_plasticity=learn,
                   per_unit=per_unit).double()
    if per_unit:                             # different η per unit too, so that a mix-up shows
        with torch.no_grad():
            core.eta_per_100ms.add_(0.2 * torch.randn(10, dtype=torch.float64))
    x = torch.randn(4, 15, 3, dtype=torch.float64)
    s0 = (0.2 * torch.randn(4, core.state_size, dtype=torch.float64)).requires_grad_()
    w = torch.randn(4, 15, 10, dtype=torch.float64)
    wM = torch.randn(4, core.state_size, dtype=torch.float64)
    grads = {}
    for use_scan in (True, False):
        core.use_scan = use_scan
        core.zero_grad()
        s0.grad = None
        h, sT = core(x, s0)
        ((h * w).sum() + (sT * wM).sum()).backward()
        grads[use_scan] = [h.detach(), sT.detach(), s0.grad.clone()] + [p.grad.clone() for p in core.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("learn,per_unit", [(False, False), (True, False), (True, True)])
def test_cpu_kernels_match_the_torch_scan(learn, per_unit):
    torch.manual_seed(1)
    core = MPNCore(3, 10, eta_per_step=0.3, lambda_per_step=0.8, learn_plasticity=learn,
                   per_unit=per_unit).double()
    if per_unit:                             # different η per unit too, so that a mix-up shows
        with torch.no_grad():
            core.eta_per_100ms.add_(0.2 * torch.randn(10, dtype=torch.float64))
    x = torch.randn(4, 15, 3, dtype=torch.float64)
    x[:, 5:8] = 0.0
    s0 = (0.2 * torch.randn(4, core.state_size, dtype=torch.float64)).requires_grad_()
    w = torch.randn(4, 15, 10, dtype=torch.float64)
    wM = torch.randn(4, core.state_size, dtype=torch.float64)
    out = {}
    try:
        for kernels in (True, False):
            MPNCore.use_cpu_kernels = kernels
            core.zero_grad()
            s0.grad = None
            h, sT = core(x, s0)
            ((h * w).sum() + (sT * wM).sum()).backward()
            with torch.no_grad():
                h_ng, sT_ng = core(x, s0)
            out[kernels] = [h.detach(), sT.detach(), h_ng, sT_ng, s0.grad.clone()] + \
                [p.grad.clone() for p in core.parameters()]
    finally:
        MPNCore.use_cpu_kernels = True
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_learnable_plasticity_is_parameterised_per_100ms_of_task_time():
    """At dt = 10 (time_scale 0.1) the per-step η, λ start at the given values, and one unit of
    change in the raw parameters moves η and the time constant as much as at dt = 100."""
    lam100 = math.exp(-100 / 1950)
    coarse = MPNCore(3, 8, eta_per_step=0.5, lambda_per_step=lam100, learn_plasticity=True,
                     lambda_max_per_step=math.exp(-100 / 10000), time_scale=1.0)
    fine = MPNCore(3, 8, eta_per_step=0.05, lambda_per_step=lam100 ** 0.1, learn_plasticity=True,
                   lambda_max_per_step=math.exp(-10 / 10000), time_scale=0.1)
    eta, lam = fine.plasticity()
    assert float(eta.detach()[0]) == pytest.approx(0.05, rel=1e-6)
    assert float(lam.detach()[0]) == pytest.approx(lam100 ** 0.1, rel=1e-6)
    # the raw parameters coincide, so an optimiser step moves both the same way in task time
    assert float(fine.eta_per_100ms.detach()) == pytest.approx(float(coarse.eta_per_100ms.detach()), rel=1e-6)
    assert float(fine.lambda_logit_per_100ms.detach()) == pytest.approx(float(coarse.lambda_logit_per_100ms.detach()), rel=1e-5)
    with torch.no_grad():
        for core in (coarse, fine):
            core.eta_per_100ms.add_(0.1)
            core.lambda_logit_per_100ms.add_(0.3)
    (e1, l1), (e10, l10) = [[float(v.detach()[0]) for v in c.plasticity()] for c in (coarse, fine)]
    assert e10 * 10 == pytest.approx(e1, rel=1e-5)          # η per 100 ms equal
    assert l10 ** 10 == pytest.approx(l1, rel=1e-5)         # decay per 100 ms equal
    with pytest.raises(ValueError, match="time_scale"):
        MPNCore(3, 8, time_scale=0.0)


def test_m_timescale_max_sets_the_bound_of_a_learnable_lambda():
    """--m-timescale-max-ms bounds M's time constant in task time (λ_max = exp(-dt/τ_max));
    an explicit --lambda-max wins; the bound never falls below the initial λ."""
    from mpn_dqn.common.config import TrainConfig
    c = TrainConfig(env_name="DelayMatchSample-v0", dt=10, m_timescale_max_ms=3000.0)
    assert c.effective_lambda_max == pytest.approx(math.exp(-10 / 3000))
    core = QNetwork(NetSpec.from_config(c, 3, 3)).core
    for _ in range(3):                                   # push λ up hard: projected under the bound
        core.lambda_logit_per_100ms.data += 50.0
        core.project_()
        assert float(core.plasticity()[1].detach()[0]) <= math.exp(-10 / 3000) + 1e-7
    assert TrainConfig(env_name="DelayMatchSample-v0", dt=10, m_timescale_max_ms=3000.0,
                       lambda_max=0.999).effective_lambda_max == 0.999
    low = TrainConfig(env_name="DelayMatchSample-v0", dt=10, m_timescale_max_ms=500.0)
    assert low.effective_lambda_max == pytest.approx(low.effective_lambda)    # 1950 ms initial


def test_the_bound_on_lambda_does_not_slow_its_learning_where_it_does_not_bind():
    """λ's gradient (per unit of θ) is the same under a tight and a loose bound while λ is below
    both — the bound clamps, it does not rescale (a scale λ_max·σ(θ) slowed λ's learning on
    ContextDM when the default bound went from 10 s to 3 s)."""
    x = torch.randn(4, 12, 3)
    grads = []
    for lam_max in (math.exp(-100 / 3000), math.exp(-100 / 10000)):
        torch.manual_seed(0)
        core = MPNCore(3, 8, eta_per_step=0.5, lambda_per_step=0.95, learn_plasticity=True, lambda_max_per_step=lam_max)
        h, _ = core(x, core.initial_state(4))
        h.square().sum().backward()
        assert float(core.plasticity()[1].detach()[0]) == pytest.approx(0.95, rel=1e-6)
        grads.append(float(core.lambda_logit_per_100ms.grad))
    assert grads[0] != 0.0
    assert grads[0] == pytest.approx(grads[1], rel=1e-6)


def _random_batch(state_size: int, B: int = 4, T: int = 6):
    """A small TD batch for a 3-input, 3-action network, zero initial state."""
    from mpn_dqn.learner.loss import TensorBatch
    g = torch.Generator().manual_seed(0)
    return TensorBatch(obs=torch.randn(B, T, 3, generator=g), actions=torch.randint(0, 3, (B, T), generator=g),
                       rewards=torch.randn(B, T, generator=g), mask=torch.ones(B, T, dtype=torch.bool),
                       init_state=torch.zeros(B, state_size))


def test_learner_projects_lambda_back_onto_its_bound_and_keeps_its_gradient():
    """After every update θ sits at or below the bound, so λ ≤ λ_max; at the bound the gradient
    is the unconstrained one, so λ can come back down."""
    from mpn_dqn.learner.learner import Learner
    spec = NetSpec(core="mpn", obs_dim=3, num_actions=3, hidden_dim=8, learn_plasticity=True,
                   eta=0.5, lambda_decay=0.95, lambda_max=0.96)
    learner = Learner(spec, gamma=0.9, device="cpu")
    core = learner.online.core
    top = math.log(0.96 / 0.04)
    batch = _random_batch(core.state_size)
    with torch.no_grad():
        core.lambda_logit_per_100ms.fill_(top + 5.0)          # as if an optimiser step had overshot the bound
    learner.update(batch)
    assert float(core.lambda_logit_per_100ms) <= top + 1e-6
    assert float(core.plasticity()[1].detach()[0]) <= 0.96 + 1e-6
    core.zero_grad()
    with torch.no_grad():
        core.lambda_logit_per_100ms.fill_(top)                # exactly at the bound
    h, _ = core(batch.obs, batch.init_state)
    h.sum().backward()
    assert float(core.lambda_logit_per_100ms.grad) != 0.0


def test_learner_projects_eta_back_onto_its_floor_and_keeps_its_gradient():
    """--eta-min-per-100ms: η ≥ its floor after every update (the stored η projected back); at
    the floor the gradient is the unconstrained one (η can rise again); the floor is per 100 ms."""
    from mpn_dqn.common.config import ConfigError, TrainConfig
    from mpn_dqn.learner.learner import Learner
    cfg = TrainConfig(env_name="DelayMatchSample-v0", dt=10, eta_min_per_100ms=0.1)
    assert cfg.effective_eta_min == pytest.approx(0.01)
    spec = NetSpec.from_config(cfg, 3, 3)
    assert spec.eta_min == pytest.approx(0.01) and spec.time_scale == pytest.approx(0.1)
    learner = Learner(dataclasses_replace(spec, hidden_dim=8), gamma=0.9, device="cpu")
    core = learner.online.core
    batch = _random_batch(core.state_size)
    with torch.no_grad():
        core.eta_per_100ms.fill_(-0.3)                  # as if an optimiser step had gone below the floor
    learner.update(batch)
    assert spec.plasticity_per_unit and core.eta_per_100ms.shape == (8,)   # the default: η per unit
    assert float(core.eta_per_100ms.min()) >= 0.1 - 1e-6   # projected: the floor per 100 ms
    assert float(core.plasticity()[0].detach().min()) >= 0.01 - 1e-7
    core.zero_grad()
    with torch.no_grad():
        core.eta_per_100ms.fill_(0.1)                   # exactly at the floor
    h, _ = core(batch.obs, batch.init_state)
    h.sum().backward()
    assert bool((core.eta_per_100ms.grad != 0.0).all())
    assert NetSpec(**{k: v for k, v in spec.to_dict().items() if k != "eta_min"}).eta_min is None
    with pytest.raises(ConfigError, match="eta-min-per-100ms"):
        TrainConfig(env_name="DelayMatchSample-v0", dt=10, eta_min_per_100ms=1.0)
    TrainConfig(env_name="DelayMatchSample-v0", dt=10, eta_min_per_100ms=1.0, learn_plasticity=False)


def test_per_unit_plasticity_gives_each_unit_its_own_eta_and_lambda():
    """Time constants start spread geometrically from a tenth of the given one up to it; a unit's
    η and λ act on its own column of M only, and each learns from its own gradient."""
    core = MPNCore(2, 5, eta_per_step=0.3, lambda_per_step=0.9, learn_plasticity=True, per_unit=True)
    eta, lam = (v.detach().double() for v in core.plasticity())
    assert eta.shape == lam.shape == (5,)
    assert torch.allclose(eta, torch.full((5,), 0.3, dtype=torch.float64), atol=1e-6)
    tau = -1.0 / torch.log(lam)
    torch.testing.assert_close(tau[-1], -1.0 / torch.log(torch.tensor(0.9, dtype=torch.float64)),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(tau / tau[-1], torch.logspace(-1, 0, 5, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    shared = MPNCore(2, 5, eta_per_step=0.3, lambda_per_step=0.9, learn_plasticity=True)
    assert shared.eta_per_100ms.shape == () and core.eta_per_100ms.shape == (5,)
    x = torch.randn(3, 6, 2)
    h, _ = core(x, core.initial_state(3))
    h[..., 2].sum().backward()               # only unit 2's output: only unit 2's plasticity learns
    g_eta, g_lam = core.eta_per_100ms.grad, core.lambda_logit_per_100ms.grad
    assert g_eta[2] != 0 and g_lam[2] != 0
    assert torch.count_nonzero(g_eta) == 1 and torch.count_nonzero(g_lam) == 1
