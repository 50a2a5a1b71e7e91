"""The shared math against diffusers' schedulers and the consistency boundary conditions."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)

from musiccm.build import SCHEDULER
from musiccm.sampling import sample_consistency, sample_ddim
from musiccm.schedule import (
    alpha_bar,
    boundary_scalings,
    consistency_output,
    ddim_step,
    ddim_timesteps,
    ema_update,
    guidance_scale_embedding,
    lcm_timesteps,
    model_output_to_x0,
    renoise,
    solver_grid,
    training_target,
    x0_from_eps,
)
from musiccm.student import consistency_scheduler


@pytest.fixture
def ddim():
    return DDIMScheduler(**SCHEDULER)


def test_ddim_step_matches_diffusers(ddim):
    ddim.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g)
    final = float(ddim.final_alpha_cumprod)
    for i, t in enumerate(ddim.timesteps.tolist()):
        eps = torch.randn(x.shape, generator=g)
        ref = ddim.step(eps, t, x, eta=0.0).prev_sample
        prev = t - 1000 // 50
        a_t = alpha_bar(ddim.alphas_cumprod, torch.tensor([t, t]), final)
        a_prev = alpha_bar(ddim.alphas_cumprod, torch.tensor([prev, prev]), final)
        ours = ddim_step(x, eps, a_t, a_prev)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        x = ref
        assert i < 50


def test_ddim_trajectory_matches_diffusers_loop(ddim):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(1, 8, 8, 4, generator=g)
    cond = torch.zeros(1, 4)

    def eps_model(x, t):
        return torch.sin(x * 0.7 + t.float()[:, None, None, None] / 500)

    ddim.set_timesteps(10)
    x = x_T.clone()
    for t in ddim.timesteps:
        x = ddim.step(eps_model(x, t.reshape(1)), t, x).prev_sample
    final = float(ddim.final_alpha_cumprod)

    def denoise(x_t, t, c):
        return x0_from_eps(x_t, eps_model(x_t, t), alpha_bar(ddim.alphas_cumprod, t, final))

    ours = sample_ddim(denoise, x_T, cond, ddim.timesteps.tolist(), ddim.alphas_cumprod, final)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_ddim_timesteps_match_diffusers(ddim):
    for n in (1, 4, 50, 200):
        ddim.set_timesteps(n)
        assert ddim_timesteps(n) == ddim.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8])
def test_lcm_timesteps_match_lcm_scheduler(steps):
    lcm = consistency_scheduler(SCHEDULER)
    lcm.set_timesteps(steps)
    assert lcm_timesteps(steps) == lcm.timesteps.tolist()


def test_lcm_timesteps_documented_values():
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(6) == [999, 839, 679, 499, 339, 179]
    assert solver_grid()[:3] == [19, 39, 59] and solver_grid()[-1] == 999


def test_lcm_timesteps_below_a_max_timestep():
    assert lcm_timesteps(4, max_timestep=759) == [759, 579, 379, 199]  # LCM's rule over the grid up to 759
    assert lcm_timesteps(1, max_timestep=760) == [759] and lcm_timesteps(2, max_timestep=999) == lcm_timesteps(2)
    assert lcm_timesteps(3, max_timestep=59) == [59, 39, 19]
    with pytest.raises(ValueError, match="1..3"):
        lcm_timesteps(4, max_timestep=59)
    with pytest.raises(ValueError, match="below the grid"):
        lcm_timesteps(1, max_timestep=10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_matches_diffusers_and_inverts_model_output_to_x0(ddim, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    a = ddim.alphas_cumprod[t]
    target = training_target(x0, noise, a, prediction_type)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, ddim.get_velocity(x0, noise, t))
    torch.testing.assert_close(model_output_to_x0(target, renoise(x0, noise, a), a, prediction_type), x0,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x0, noise, a, "flow")


def test_boundary_conditions():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert c_skip[2] < 1e-8 and abs(c_out[2] - 1) < 1e-8
    ref = LCMScheduler(**SCHEDULER)
    for t in (0, 1, 19, 259, 999):
        rs, ro = ref.get_scalings_for_boundary_condition_discrete(t)
        s, o = boundary_scalings(torch.tensor([t]))
        assert abs(float(s) - rs) < 1e-7 and abs(float(o) - ro) < 1e-7
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(consistency_output(x, torch.zeros_like(x), torch.zeros(3, dtype=torch.long)), x)


def test_true_x0_denoiser_is_recovered_in_one_step():
    ac = DDIMScheduler(**SCHEDULER).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 8, 16, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_T = renoise(x0, noise, alpha_bar(ac, torch.tensor([999, 999]), 1.0))
    out = sample_consistency(lambda x, t, c: x0, x_T, torch.zeros(2, 1), [999], ac, g)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_multistep_consistency_matches_lcm_scheduler():
    """Our multistep loop equals LCMScheduler.step driven by the same eps model and noise."""
    lcm = consistency_scheduler(SCHEDULER)
    lcm.set_timesteps(4)
    x_T = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(3))

    def eps_model(x, t):
        return torch.tanh(x) * 0.5 + 0.01 * t.float()[:, None, None, None] / 1000

    x = x_T.clone()
    g = torch.Generator().manual_seed(7)
    for t in lcm.timesteps:
        x = lcm.step(eps_model(x, t.reshape(1)), t, x, generator=g).prev_sample
    ac = lcm.alphas_cumprod

    def denoise(x_t, t, c):
        return x0_from_eps(x_t, eps_model(x_t, t), alpha_bar(ac, t, 1.0))

    ours = sample_consistency(denoise, x_T, torch.zeros(1, 1), lcm.timesteps.tolist(), ac,
                              torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_guidance_embedding_matches_diffusers():
    w = torch.tensor([0.0, 1.0, 2.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), ref)


def test_ema_update():
    target = [torch.nn.Parameter(torch.zeros(3))]
    source = [torch.nn.Parameter(torch.ones(3))]
    ema_update(target, source, 0.95)
    torch.testing.assert_close(target[0].data, torch.full((3,), 0.05))
    ema_update(target, source, 1.0)
    torch.testing.assert_close(target[0].data, torch.full((3,), 0.05))
