"""Consistency-distillation loss math (musiccm.distill.losses): agreement with hand-computed formulas and
diffusers' DDIMScheduler, boundary conditions, an exactly-consistent teacher, hinge and R1 properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler

from musiccm.build import SCHEDULER
from musiccm.distill import losses
from musiccm.schedule import boundary_scalings, ema_update, solver_grid

SHAPE = (3, 8, 8, 16)


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    return DDIMScheduler(**SCHEDULER).alphas_cumprod.float()


def linear_eps(seed: int = 0):
    """A deterministic teacher ε(x, t, c) that depends on x, t and c, counting its calls."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SHAPE[1:], generator=g) * 0.3
    proj = torch.randn(512, SHAPE[1], generator=g) * 0.1
    calls = []

    def eps(x, t, c):
        calls.append(x.shape[0])
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1)
        return 0.5 * x * (1 - tt) + a * tt + (c @ proj)[:, :, None, None]

    return eps, calls


def conds(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    return c, u


def test_solver_timesteps_on_the_grid():
    g = torch.Generator().manual_seed(0)
    grid = set(solver_grid())
    for k in (1, 3, 10):
        start, prev = losses.sample_solver_timesteps(2000, k, g)
        assert start.dtype == torch.long and set(start.tolist()) <= grid
        assert len(set(start.tolist())) == 50  # every grid point is drawn
        assert torch.equal(prev, (start - 20 * k).clamp(min=0))
    a = losses.sample_solver_timesteps(8, 1, torch.Generator().manual_seed(5))
    b = losses.sample_solver_timesteps(8, 1, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="k_skip"):
        losses.sample_solver_timesteps(2, 0, None)
    start, prev = losses.sample_solver_timesteps(2000, 5, g, max_timestep=599)
    assert set(start.tolist()) == {t for t in grid if t <= 599}  # the cut grid, all of it
    assert torch.equal(prev, (start - 100).clamp(min=0))
    with pytest.raises(ValueError, match="below the solver grid"):
        losses.sample_solver_timesteps(2, 1, None, max_timestep=10)


def test_solver_target_equals_hand_computed_guided_ddim(alphas):
    eps, calls = linear_eps()
    b = SHAPE[0]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t, t_prev = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 0])
    c, u = conds(b)
    a_t = alphas[t].double().reshape(-1, 1, 1, 1)
    a_p = alphas[t_prev].double().reshape(-1, 1, 1, 1)

    def psi(e):  # the DDIM increment Ψ(x) = DDIM(x; ε) − x, in float64
        e = e.double()
        x0 = (x.double() - (1 - a_t).sqrt() * e) / a_t.sqrt()
        return a_p.sqrt() * x0 + (1 - a_p).sqrt() * e - x.double()

    for w in (2.0, torch.tensor([0.0, 1.5, 7.0])):
        calls.clear()
        got = losses.solver_target(eps, x, t, t_prev, c, u, w, alphas)
        assert calls == [2 * b]  # cond and uncond in ONE batched forward
        # MusicCM eq. 5–6 by hand: x̂ = x + (1+w)·Ψ(x, c) − w·Ψ(x, ∅).
        ww = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1, 1, 1)
        want = x.double() + (1 + ww) * psi(eps(x, t, c)) - ww * psi(eps(x, t, u.expand(b, -1)))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_solver_target_matches_diffusers_ddim_step(alphas):
    eps, _ = linear_eps(3)
    sched = DDIMScheduler(**SCHEDULER)
    sched.set_timesteps(50)  # step ratio 20: prev = t − 20, and final_alpha_cumprod below t = 0
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    c, u = conds(SHAPE[0])
    w = 2.0
    for t_value in (999, 499, 19):
        t = torch.full((SHAPE[0],), t_value)
        t_prev = (t - 20).clamp(min=0)
        got = losses.solver_target(eps, x, t, t_prev, c, u, w, alphas)
        guided = (1 + w) * eps(x, t, c) - w * eps(x, t, u.expand(SHAPE[0], -1))
        want = sched.step(guided, t_value, x).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-5)


def test_consistency_loss_values():
    p, q = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.0, 0.0, 0.0])
    c = 0.001
    want = ((p - q) ** 2 + c**2).sqrt().sub(c).mean()
    torch.testing.assert_close(losses.consistency_loss(p, q, "huber", c), want)
    torch.testing.assert_close(losses.consistency_loss(p, q, "l2", c), torch.tensor(5.0 / 3))
    assert float(losses.consistency_loss(p, p, "huber", c)) == 0.0
    with pytest.raises(ValueError, match="huber"):
        losses.consistency_loss(p, q, "l1", c)


def test_boundary_condition_target_at_t0_ignores_the_target_network(alphas):
    """f(x, 0) = x: at t_n = 0 the target is the teacher's x̂ itself, whatever the EMA network says."""
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    assert float(c_skip[2]) < 1e-5 and float(c_out[2]) > 0.9999
    eps, _ = linear_eps()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    c, u = conds(SHAPE[0])
    t, t_prev = torch.full((SHAPE[0],), 19), torch.zeros(SHAPE[0], dtype=torch.long)
    student = lambda x, t, c, w: x * 0.1
    w = torch.full((SHAPE[0],), 2.0)
    results = []
    for target in (lambda x, t, c, w: x * 0, lambda x, t, c, w: x * 100 + 5):
        loss, _ = losses.consistency_distillation_loss(student, target, eps, x0, noise, t, t_prev, c, u, w, alphas,
                                                       "l2", 0.001)
        results.append(float(loss))
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_exactly_consistent_teacher_gives_zero_distillation_loss(alphas):
    """Point-mass data μ(c) (linear in the condition): the exact ε* = (x − √ᾱ μ)/√(1−ᾱ) makes guided DDIM the
    exact ODE (it is affine in μ, so CFG just gives μ_g = (1+w)μ(c) − wμ(∅)), hence
    F(x_t, t) = √ᾱ₀·μ_g + √(1−ᾱ₀)·ε*(x_t) is an exact consistency function with F(x, 0) = x. A student and
    target realising F have ~0 loss for any k and w; a perturbed student does not."""
    b = 4
    g = torch.Generator().manual_seed(11)
    proj = torch.randn(512, SHAPE[1] * SHAPE[2] * SHAPE[3], generator=g) * 0.05

    def mu(c):
        return (c @ proj).reshape(-1, *SHAPE[1:])

    def teacher_eps(x, t, c):
        a = alphas[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * mu(c)) / (1 - a).sqrt()

    cond, uncond = conds(b, seed=12)
    a0 = alphas[0]

    def exact(x, t, c, w):  # x0 prediction whose consistency output is F
        ww = w.reshape(-1, 1, 1, 1)
        mu_g = (1 + ww) * mu(c) - ww * mu(uncond)
        a = alphas[t].reshape(-1, 1, 1, 1)
        f = a0.sqrt() * mu_g + (1 - a0).sqrt() * (x - a.sqrt() * mu_g) / (1 - a).sqrt()
        c_skip, c_out = (s.reshape(-1, 1, 1, 1) for s in boundary_scalings(t))
        return torch.where(c_out > 0, (f - c_skip * x) / c_out.clamp_min(1e-12), torch.zeros_like(x))

    for k_skip, w_value in ((1, 2.0), (5, 0.0), (20, 3.5)):
        x0 = mu(cond)  # samples of the conditional point masses
        noise = torch.randn(x0.shape, generator=g)
        t, t_prev = losses.sample_solver_timesteps(b, k_skip, g)
        w = torch.full((b,), w_value)
        loss, _ = losses.consistency_distillation_loss(exact, exact, teacher_eps, x0, noise, t, t_prev, cond, uncond,
                                                       w, alphas, "l2", 0.001)
        assert float(loss) < 1e-9, (k_skip, float(loss))
        wrong = lambda x, t, c, w: exact(x, t, c, w) + 0.05
        bad, _ = losses.consistency_distillation_loss(wrong, exact, teacher_eps, x0, noise, t, t_prev, cond, uncond,
                                                      w, alphas, "l2", 0.001)
        assert float(bad) > 1e-4


def test_hinge_losses_by_hand():
    real = [torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-3.0, 0.0]]), torch.tensor([[1.0]])]
    # head 1: mean(relu(1−[2, .5])) = .25, mean(relu(1+[−3, 0])) = .5 → .75; head 2: 2 + 2 = 4 → mean 2.375
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(2.375)
    assert float(losses.hinge_g_loss(fake)) == pytest.approx((1.5 - 1.0) / 2)
    assert float(losses.hinge_d_loss(torch.ones(3) * 5, -torch.ones(3) * 5)) == 0.0


class IgnoringHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.3))

    def forward(self, feat):
        return self.bias.expand(feat.shape[0], feat.shape[1]) + 0 * feat.detach().sum(-1)


def test_r1_zero_for_heads_that_ignore_their_input_and_analytic_otherwise():
    feat = torch.randn(4, 5, 6, requires_grad=True)
    assert float(losses.r1_penalty([IgnoringHead()(feat)], [feat])) == 0.0
    lin = nn.Linear(6, 1)
    out = lin(feat).squeeze(-1)  # (B, N): ∂Σ/∂feat[b, n] = w → ||∇||² per sample = N·||w||²
    want = 5 * lin.weight.pow(2).sum()
    torch.testing.assert_close(losses.r1_penalty(out, feat), want)
    # R1 must be trainable (create_graph): its gradient reaches the head's weights.
    losses.r1_penalty(out, feat).backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_ema_update_and_warmup():
    target = [nn.Parameter(torch.tensor([1.0, 2.0]))]
    source = [nn.Parameter(torch.tensor([3.0, -2.0]))]
    ema_update(target, source, 0.95)
    torch.testing.assert_close(target[0].data, torch.tensor([0.95 * 1 + 0.05 * 3, 0.95 * 2 + 0.05 * -2]))
    assert losses.warmup_lr(1e-4, 0, 100) == pytest.approx(1e-6)
    assert losses.warmup_lr(1e-4, 99, 100) == pytest.approx(1e-4)
    assert losses.warmup_lr(1e-4, 500, 100) == pytest.approx(1e-4)
    assert losses.warmup_lr(1e-4, 0, 0) == pytest.approx(1e-4)


def test_sample_guidance():
    assert torch.equal(losses.sample_guidance(3, 2.0, None, None, None), torch.full((3,), 2.0))
    w = losses.sample_guidance(1000, 2.0, 1.0, 4.0, torch.Generator().manual_seed(0))
    assert 1.0 <= float(w.min()) and float(w.max()) <= 4.0 and abs(float(w.mean()) - 2.5) < 0.15
