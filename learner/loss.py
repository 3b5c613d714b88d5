"""The TD loss: double DQN over padded batches of whole trials, with truncated BPTT.

Read :func:`td_loss` top to bottom; it is the whole algorithm.  Notation: B trials, T padded
steps, A actions, S state floats, N burn-in steps, C the BPTT chunk length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TensorBatch:
    """A padded batch of trials on the learner's device (see ``replay.TrialBatch``).

    obs [B,T,O] float; actions [B,T] long; rewards [B,T] float; mask [B,T] bool (True on real
    steps, left-aligned); init_state [B,S] float (the state replay starts from);
    burnin_obs [B,N,O], burnin_mask [B,N] (right-aligned), burnin_state [B,S] — N may be 0.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    init_state: torch.Tensor
    burnin_obs: torch.Tensor | None = None
    burnin_mask: torch.Tensor | None = None
    burnin_state: torch.Tensor | None = None


def n_step_targets(rewards: torch.Tensor, mask: torch.Tensor, q_online: torch.Tensor,
                   q_target: torch.Tensor, gamma: float, n_step: int,
                   actions: torch.Tensor | None = None, cut_non_greedy: bool = False) -> torch.Tensor:
    """Double-DQN n-step targets that never bootstrap past the trial's end.

    rewards [B,T], mask [B,T] bool, q_online [B,T,A] (online net, no grad), q_target [B,T,A]
    (target net on its own recurrence), actions [B,T] (needed with ``cut_non_greedy``).  With
    v_s = Q_target(s, argmax_a Q_online(s, a)), for a real step t of a trial of length L::

        y_t = Σ_{k<n, t+k<L} γ^k r_{t+k}  +  [t+n < L] · γ^n · v_{t+n}

    With ``cut_non_greedy`` the return stops early at the first later step t+k (0 < k < n) whose
    replayed action is not the online net's greedy action there, and bootstraps from it:
    ``y_t = Σ_{j<k} γ^j r_{t+j} + γ^k v_{t+k}`` (Watkins's Q(λ) cut).  Exploratory actions —
    at fine dt, dozens of ε-steps inside a 50-step window, each a fixation-break penalty — then
    never enter the return of the action being evaluated.

    The trial's last step is terminal (the trial's answer has been scored).  Returns y [B,T]
    (zeros on padded steps).
    """
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    r = rewards * m
    a_star = q_online.argmax(dim=-1, keepdim=True)                     # [B,T,1]
    v = q_target.gather(-1, a_star).squeeze(-1) * m                    # [B,T]; 0 past the end
    # g: 1 where the return may run on through a step, 0 where it is cut (a non-greedy replayed
    # action; padding counts as greedy, r = v = 0 there anyway).  Without the cut: all 1.
    if cut_non_greedy:
        if actions is None:
            raise ValueError("cut_non_greedy needs the replayed actions")
        g = ((actions == a_star.squeeze(-1)) | ~mask).to(r.dtype)     # [B,T]
    else:
        g = torch.ones_like(r)
    y = r.clone()                                                      # k = 0: the evaluated action's reward
    alive = torch.ones_like(r)                                         # no cut yet in t+1 .. t+k-1
    for k in range(1, min(n_step, T)):                                 # + γ^k r_{t+k}, or γ^k v_{t+k} and stop
        gk = g[:, k:]
        y[:, : T - k] += alive[:, : T - k] * (gamma ** k) * (gk * r[:, k:] + (1 - gk) * v[:, k:])
        alive[:, : T - k] *= gk
    if n_step < T:                                                     # + γ^n v_{t+n}
        y[:, : T - n_step] += alive[:, : T - n_step] * (gamma ** n_step) * v[:, n_step:]
    return y * m


def step_weights(mask: torch.Tensor, plain_weight: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loss weight of every step [B,T]: 1 on the trial's last step (its outcome, a point event
    in task time), ``plain_weight`` on its other real steps; 0 on padding.

    With ``plain_weight = dt / 100 ms`` the loss weighs the stretches of a trial by their
    duration (a fixation break held for 100 ms is 10 penalised steps at dt 10, 1 at dt 100) and
    each trial's outcome once, so it is the same function of the task at any dt; at dt = 100
    every weight is 1 (the plain mean over steps).  Uniform weights at dt = 10 bury the one
    step that answers under ~230 others: measured, the agent then never learned to use a
    representation that already separated the answers 98 % linearly.
    """
    m = mask.to(dtype)
    if plain_weight == 1.0:
        return m
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return torch.where(last, torch.ones_like(m), torch.full_like(m, plain_weight)) * m


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    return F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=delta)


def td_loss(online: torch.nn.Module, target: torch.nn.Module, batch: TensorBatch, *, gamma: float,
            n_step: int = 1, huber_delta: float = 1.0, chunk_size: int | None = None,
            backward: bool = False, cut_non_greedy: bool = False,
            plain_step_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Double-DQN TD loss over a padded batch of trials, with truncated BPTT.

    ``online`` and ``target`` map ``(obs [B,t,O], state [B,S], mask=None)`` to
    ``(q [B,t,A], state [B,S])``.

    1. Start states.  Both networks start from ``batch.init_state``.  With burn-in, each then
       runs *its own* recurrence over ``burnin_obs`` (no gradient; masked steps leave the
       state unchanged) from ``burnin_state``.
    2. Targets (no gradient).  The target network runs its own recurrence over the whole
       trial; the online network's argmax picks the action (double DQN); returns are n-step
       and stop at the trial's end (:func:`n_step_targets`; with ``cut_non_greedy`` also at
       the first non-greedy replayed action).
    3. Loss.  The online network runs over the trial in chunks of ``chunk_size`` steps (None:
       one chunk).  The state is carried from chunk to chunk but detached, so gradients are
       truncated at chunk boundaries.  Each chunk contributes
       ``Σ_t w_t · huber(Q(s_t, a_t) - y_t) / Σ_t w_t`` over the batch's real steps, with
       w_t = 1 on each trial's last step and ``plain_step_weight`` elsewhere (:func:`step_weights`; with
       the default 1.0 this is the mean over real steps); with
       ``backward=True`` each chunk's loss is back-propagated as soon as it is computed, so only
       one chunk's graph is alive at a time (peak memory falls with the chunk size).

    Returns (loss, stats): the loss is a scalar tensor (detached when ``backward=True``);
    stats holds 0-d tensors ``q_mean, q_max, td_abs`` over real steps (tensors, so a GPU
    learner is not forced to synchronise on every update).
    """
    obs, actions, mask = batch.obs, batch.actions, batch.mask
    B, T, _ = obs.shape
    n_real = mask.sum().clamp(min=1).to(obs.dtype)
    w = step_weights(mask, plain_step_weight, obs.dtype)                         # [B,T]
    w_sum = w.sum().clamp(min=1e-12)
    chunk = T if chunk_size is None else max(1, min(int(chunk_size), T))

    # 1. start states
    with torch.no_grad():
        s_online = batch.init_state
        s_target = batch.init_state
        if batch.burnin_obs is not None and batch.burnin_obs.shape[1] > 0:
            _, s_online = online(batch.burnin_obs, batch.burnin_state, mask=batch.burnin_mask)
            _, s_target = target(batch.burnin_obs, batch.burnin_state, mask=batch.burnin_mask)

    # 2. targets
    with torch.no_grad():
        q_target, _ = target(obs, s_target)                                      # [B,T,A]
        q_online_ng = online(obs, s_online)[0] if chunk < T else None            # [B,T,A]

    # 3. loss, chunk by chunk
    total = obs.new_zeros(())
    q_sum = obs.new_zeros(())
    q_max = obs.new_full((), -float("inf"))
    td_sum = obs.new_zeros(())
    y_full = None
    if q_online_ng is not None:
        y_full = n_step_targets(batch.rewards, mask, q_online_ng, q_target, gamma, n_step,
                                actions, cut_non_greedy)
    state = s_online.detach()
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        q, state = online(obs[:, start:end], state)                              # [B,c,A]
        state = state.detach()
        if y_full is None:                                                       # one chunk
            y = n_step_targets(batch.rewards, mask, q.detach(), q_target, gamma, n_step,
                               actions, cut_non_greedy)
        else:
            y = y_full[:, start:end]
        m = mask[:, start:end]
        q_taken = q.gather(-1, actions[:, start:end, None]).squeeze(-1)          # [B,c]
        err = q_taken - y
        loss = (huber(err, huber_delta) * w[:, start:end]).sum() / w_sum
        if backward:
            loss.backward()
            loss = loss.detach()
        total = total + loss
        with torch.no_grad():
            md = m.to(q.dtype)
            q_sum += (q.detach().mean(-1) * md).sum()
            q_max = torch.maximum(q_max, torch.where(m[..., None], q.detach(), -float("inf")).max())
            td_sum += (err.detach().abs() * md).sum()
    stats = {"q_mean": q_sum / n_real, "q_max": q_max, "td_abs": td_sum / n_real}
    return total, stats
