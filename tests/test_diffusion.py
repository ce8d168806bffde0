"""The Gaussian diffusion module, checked against closed forms and an exact denoiser.

For data x0 ~ N(mu, s^2 I) the optimal denoiser is known in closed form:
E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu). With it as the "model",
the samplers must reproduce the data distribution, and DDIM with eta = 0 must invert.
"""

from __future__ import annotations

import math

import pytest
import torch

from unclip.models import diffusion as gd
from unclip.models.diffusion import GaussianDiffusion, Target

MU, S = 0.7, 0.4


def exact_model(base: GaussianDiffusion, target: Target):
    """The optimal model for N(MU, S^2) data, in ``target``'s parameterisation, indexed by the
    original timesteps (so it serves respaced processes too)."""
    ab_table = base.alphas_cumprod

    def model(x_t, t):
        ab = ab_table[t].reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        x0 = MU + ab.sqrt() * S**2 / (ab * S**2 + 1 - ab) * (x_t - ab.sqrt() * MU)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {Target.X0: x0, Target.EPSILON: eps, Target.V: ab.sqrt() * eps - (1 - ab).sqrt() * x0}[target]

    return model


def test_linear_schedule_matches_ddpm_and_rescales():
    b = gd.betas("linear", 1000)
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b100 = gd.betas("linear", 100)
    assert b100[0].item() == pytest.approx(1e-3) and b100[-1].item() == pytest.approx(0.2)


def test_cosine_schedule_matches_its_closed_form():
    steps = 1000
    d = GaussianDiffusion.from_schedule("cosine", steps)

    def f(t):
        return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    b = gd.betas("cosine", steps)
    free = int((b < 0.999).sum())  # the cap only bites at the very end
    assert free > 990
    for k in (0, 10, 250, 500, 750, free - 1):
        assert d.alphas_cumprod[k].item() == pytest.approx(f(k + 1) / f(0), rel=1e-9)
    assert b.max().item() == pytest.approx(0.999)


def test_lookup_broadcasts_to_any_rank_and_dtype():
    d = GaussianDiffusion.from_schedule("cosine", 100)
    t = torch.tensor([0, 50, 99])
    for shape in [(3, 1024), (3, 3, 8, 8)]:
        x = torch.ones(shape, dtype=torch.float16)
        v = d._at(d.sqrt_alphas_cumprod, t, x)
        assert v.shape == (3,) + (1,) * (len(shape) - 1) and v.dtype == torch.float16
        assert d.q_sample(x, t, torch.zeros(shape, dtype=torch.float16)).shape == shape


def test_q_sample_has_the_forward_process_statistics():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    for k in (10, 300, 900):
        t = torch.full((n,), k)
        x = d.q_sample(torch.full((n, 2), 0.5, dtype=torch.float64), t,
                       torch.randn(n, 2, generator=g, dtype=torch.float64))
        ab = d.alphas_cumprod[k].item()
        sem = math.sqrt((1 - ab) / (2 * n))
        assert abs(x.mean().item() - 0.5 * math.sqrt(ab)) < 4 * sem
        assert x.var().item() == pytest.approx(1 - ab, rel=0.03)


@pytest.mark.parametrize("target", list(Target))
def test_each_target_round_trips_to_x0_and_noise(target):
    d = GaussianDiffusion.from_schedule("cosine", 200, target=target)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 100, 150, 199])
    x_t = d.q_sample(x0, t, noise)
    got_x0, got_eps = d.predict_x0_eps(x_t, t, d.target_for(x0, t, noise))
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, noise)


@pytest.mark.parametrize("target", list(Target))
def test_training_loss_is_zero_for_the_right_answer(target):
    d = GaussianDiffusion.from_schedule("cosine", 100, target=target)
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([3, 30, 60, 99])

    def oracle(x_t, t_model):
        return d.target_for(x0, t_model, noise)

    loss = d.training_loss(oracle, x0, t, noise=noise)
    assert loss.shape == (4,) and loss.max().item() < 1e-10
    assert d.training_loss(lambda x_t, t_model: torch.zeros_like(x_t), x0, t, noise=noise).min().item() > 0.01
    with pytest.raises(ValueError, match="returned"):
        d.training_loss(lambda x_t, t_model: x_t[:, :1], x0, t)


def test_respacing_keeps_the_cumulative_alphas_and_maps_timesteps():
    d = GaussianDiffusion.from_schedule("cosine", 1000, target="x0")
    r = d.respaced(50)
    assert r.num_steps == 50 and r.timesteps[0].item() == 0 and r.timesteps[-1].item() == 999
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[r.timesteps])
    assert r.target is Target.X0
    assert d.respaced([0, 10, 20]).timesteps.tolist() == [0, 10, 20]
    torch.testing.assert_close(d.respaced(1000).betas, d.betas)
    with pytest.raises(ValueError):
        d.respaced(0)
    # one step samples from pure noise: it is the last step, and the model is told so
    one = d.respaced(1)
    assert one.timesteps.tolist() == [999]
    seen = []

    def model(x_t, t_model):
        seen.append(t_model.tolist())
        return torch.full_like(x_t, 0.3)

    x = one.sample(model, (2, 3), generator=torch.Generator().manual_seed(0), sampler="ddim", eta=0.0)
    assert seen == [[999, 999]]
    torch.testing.assert_close(x, torch.full((2, 3), 0.3))


@pytest.mark.parametrize("target", list(Target))
# DDPM with the posterior ("fixed small") variance leaves out the model's uncertainty about x0, so it
# under-disperses with few steps (std 0.382 at 100 steps, 0.394 at 250, 0.399 at 1,000), and so does
# DDIM with eta = 1; the deterministic DDIM (eta = 0) is right at 100
@pytest.mark.parametrize("sampler, eta, steps", [("ddpm", 0.0, 1000), ("ddim", 0.0, 100), ("ddim", 1.0, 1000)])
def test_samplers_reproduce_the_data_distribution(target, sampler, eta, steps):
    base = GaussianDiffusion.from_schedule("cosine", 1000, target=target)
    d = base.respaced(steps)
    g = torch.Generator().manual_seed(2)
    x = d.sample(exact_model(base, target), (20_000, 2), sampler=sampler, eta=eta, generator=g, dtype=torch.float64)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("steps, max_err", [(1000, 0.015), (200, 0.07)])
def test_ddim_is_deterministic_and_inverts_to_its_noise(steps, max_err):
    # the inversion error is DDIM's discretisation error, about 1/steps (measured, max |error|: 0.22
    # at 50 steps, 0.057 at 200, 0.012 at 1,000)
    base = GaussianDiffusion.from_schedule("cosine", 1000, target="x0")
    d = base.respaced(steps)
    model = exact_model(base, Target.X0)
    noise = torch.randn(256, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = d.sample(model, noise.shape, noise=noise)
    b = d.sample(model, noise.shape, noise=noise.clone())
    assert torch.equal(a, b)
    back = d.ddim_invert(model, a)
    assert (back - noise).abs().max().item() < max_err


def test_ddpm_sampling_is_deterministic_under_a_seed():
    base = GaussianDiffusion.from_schedule("linear", 100, target="epsilon")
    model = exact_model(base, Target.EPSILON)
    a = base.sample(model, (4, 3), sampler="ddpm", generator=torch.Generator().manual_seed(4))
    b = base.sample(model, (4, 3), sampler="ddpm", generator=torch.Generator().manual_seed(4))
    c = base.sample(model, (4, 3), sampler="ddpm", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_classifier_free_guidance_mixes_the_two_passes():
    def model(x, t, drop):  # conditional output 1, unconditional 0, plus x to check batching
        return x + (~drop).float()[:, None]

    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    cond = torch.zeros(3, dtype=torch.bool)
    uncond = {"drop": torch.ones(3, dtype=torch.bool)}
    assert torch.equal(gd.guided(model, 1.0, uncond_kwargs=uncond)(x, t, drop=cond), torch.ones(3, 2))
    assert torch.equal(gd.guided(model, 0.0, uncond_kwargs=uncond)(x, t, drop=cond), torch.zeros(3, 2))
    assert torch.equal(gd.guided(model, 3.0, uncond_kwargs=uncond)(x, t, drop=cond), torch.full((3, 2), 3.0))
    with pytest.raises(TypeError, match="not arguments"):
        gd.guided(model, 2.0, uncond_kwargs={"other": x})(x, t, drop=cond)
