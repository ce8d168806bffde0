"""The Gaussian diffusion process shared by the diffusion prior, the decoder and both upsamplers.

MISSION "Prior" (the diffusion prior predicts the un-noised embedding, MSE on x0), "Decoder" and
"Upsamplers" (image models), after DDPM (Ho et al. 2020), improved DDPM's cosine schedule (Nichol &
Dhariwal 2021), DDIM (Song et al. 2021) and classifier-free guidance (Ho & Salimans 2021).

Not an ``nn.Module`` and never imports a network: the training loss and the samplers take the model
as a function ``model(x_t, t, **kwargs) -> output``. The schedule lives in float64 and is looked up
per timestep, cast to the input's dtype and broadcast to its rank, so [N, 1024] embeddings and
[N, 3, H, W] images share every line. What the model predicts is an enum (``Target``); sampling with
fewer steps is a setting (``respaced``), not a different model: the respaced process hands the model
the original timestep indices it was trained on.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Iterator, Sequence

import torch

Model = Callable[..., torch.Tensor]


class Target(str, enum.Enum):
    """What the network predicts: the clean sample, the noise, or v = sqrt(ab) eps - sqrt(1 - ab) x0."""

    X0 = "x0"
    EPSILON = "epsilon"
    V = "v"


class Schedule(str, enum.Enum):
    LINEAR = "linear"
    COSINE = "cosine"


def betas(schedule: Schedule | str, steps: int) -> torch.Tensor:
    """The noise schedule, float64 [steps].

    - linear: DDPM's 1e-4 to 0.02 over 1,000 steps, scaled by 1000 / steps so that other step counts
      end at the same noise level;
    - cosine: alpha_bar(t) = cos((t / T + s) / (1 + s) * pi / 2)^2 with s = 0.008, betas capped at
      0.999 so the last step stays finite.
    """
    schedule = Schedule(schedule)
    if steps < 1:
        raise ValueError(f"a diffusion needs at least one step, got {steps}")
    if schedule is Schedule.LINEAR:
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class GaussianDiffusion:
    """q(x_t | x_0), the training loss, and DDPM / DDIM sampling for one schedule.

    ``timesteps`` maps this process's step index to the index the model was trained with (the
    identity unless ``respaced``). ``clip_x0`` clamps predicted clean samples to [-1, 1] while
    sampling (images); leave it off for embeddings.
    """

    def __init__(self, betas: torch.Tensor, *, target: Target | str = Target.EPSILON,
                 timesteps: Sequence[int] | None = None, clip_x0: bool = False) -> None:
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.ndim != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.betas = b
        self.num_steps = len(b)
        self.target = Target(target)
        self.clip_x0 = clip_x0
        self.timesteps = torch.as_tensor(list(range(self.num_steps)) if timesteps is None else list(timesteps),
                                         dtype=torch.long)
        if len(self.timesteps) != self.num_steps:
            raise ValueError("timesteps must name one model timestep per step")
        alphas = 1 - b
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = b * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # the first posterior variance is 0: its log takes the second's (guided-diffusion's clipping)
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_coef_x0 = b * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_coef_xt = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_schedule(cls, schedule: Schedule | str, steps: int, **kw) -> GaussianDiffusion:
        return cls(betas(schedule, steps), **kw)

    # -- lookup ---------------------------------------------------------------------------------------
    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as ``like``'s dtype and device, shaped [N, 1, ..., 1] to broadcast against it."""
        v = table.to(t.device)[t].to(like.dtype)
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep indices to hand the model (the original ones for a respaced process)."""
        return self.timesteps.to(t.device)[t]

    # -- the forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def target_for(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.target is Target.X0:
            return x0
        if self.target is Target.EPSILON:
            return noise
        return self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def predict_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean sample and the noise implied by a model output under this target."""
        a, s = self._at(self.sqrt_alphas_cumprod, t, x_t), self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.target is Target.X0:
            x0 = out
        elif self.target is Target.EPSILON:
            x0 = (x_t - s * out) / a
        else:  # v: x0 = a x_t - s v
            x0 = a * x_t - s * out
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        return x0, (x_t - a * x0) / s

    def training_loss(self, model: Model, x0: torch.Tensor, t: torch.Tensor, *, noise: torch.Tensor | None = None,
                      model_kwargs: dict | None = None) -> torch.Tensor:
        """Per-sample MSE between the model's output and its target, [N] (mean over the other dims)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        if out.shape != x0.shape:
            raise ValueError(f"the model returned {tuple(out.shape)} for inputs of shape {tuple(x0.shape)}")
        err = (out.float() - self.target_for(x0, t, noise).float()) ** 2
        return err.reshape(len(x0), -1).mean(dim=1)

    def sample_timesteps(self, n: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (n,), device=device, generator=generator)

    # -- respacing ------------------------------------------------------------------------------------
    def respaced(self, steps: int | Sequence[int]) -> GaussianDiffusion:
        """The same process on a subset of its steps (``steps`` evenly spaced ones from the last to the
        first, or the given indices), for sampling in fewer steps with the model trained on all of them:
        each kept step's cumulative alpha is unchanged, and the betas between kept steps are recomputed from them."""
        if isinstance(steps, int):
            if not 1 <= steps <= self.num_steps:
                raise ValueError(f"respacing to {steps} steps of {self.num_steps}")
            # the first and last steps always (one step: the last, since sampling starts from pure noise)
            keep = ([self.num_steps - 1] if steps == 1 else
                    sorted({round(i * (self.num_steps - 1) / (steps - 1)) for i in range(steps)}))
        else:
            keep = sorted(set(int(s) for s in steps))
            if not keep or keep[0] < 0 or keep[-1] >= self.num_steps:
                raise ValueError(f"respacing: steps must lie in [0, {self.num_steps})")
        ab = self.alphas_cumprod[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return GaussianDiffusion(1 - ab / prev, target=self.target, timesteps=self.timesteps[keep].tolist(),
                                 clip_x0=self.clip_x0)

    # -- sampling -------------------------------------------------------------------------------------
    def _steps(self) -> Iterator[int]:
        return iter(range(self.num_steps - 1, -1, -1))

    def _full(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), i, device=x.device, dtype=torch.long)

    def ddpm_step(self, model: Model, x_t: torch.Tensor, i: int, *, model_kwargs: dict | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} with the posterior ("fixed small") variance."""
        t = self._full(i, x_t)
        x0, _ = self.predict_x0_eps(x_t, t, model(x_t, self.model_timesteps(t), **(model_kwargs or {})))
        mean = self._at(self.posterior_coef_x0, t, x_t) * x0 + self._at(self.posterior_coef_xt, t, x_t) * x_t
        if i == 0:
            return mean
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + (0.5 * self._at(self.posterior_log_variance, t, x_t)).exp() * noise

    def ddim_step(self, model: Model, x_t: torch.Tensor, i: int, *, eta: float = 0.0, model_kwargs: dict | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        t = self._full(i, x_t)
        x0, eps = self.predict_x0_eps(x_t, t, model(x_t, self.model_timesteps(t), **(model_kwargs or {})))
        ab, ab_prev = self._at(self.alphas_cumprod, t, x_t), self._at(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        mean = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if i == 0 or eta == 0:
            return mean
        return mean + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)

    def ddim_reverse_step(self, model: Model, x_t: torch.Tensor, i: int, *,
                          model_kwargs: dict | None = None) -> torch.Tensor:
        """DDIM run backwards (eta = 0): x_{t-1} -> x_t given the model at step i - 1 (inversion)."""
        t = self._full(i - 1, x_t) if i > 0 else self._full(0, x_t)
        x0, eps = self.predict_x0_eps(x_t, t, model(x_t, self.model_timesteps(t), **(model_kwargs or {})))
        ab_next = self._at(self.alphas_cumprod, self._full(i, x_t), x_t)
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps

    def sample(self, model: Model, shape: Sequence[int], *, sampler: str = "ddim", eta: float = 0.0,
               noise: torch.Tensor | None = None, model_kwargs: dict | None = None,
               generator: torch.Generator | None = None, device=None, dtype=torch.float32,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Draw samples from pure noise (``noise``, or drawn from ``generator``): ``sampler`` is
        "ddpm" (ancestral) or "ddim" (with ``eta``)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', not {sampler!r}")
        x = noise if noise is not None else torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        with torch.no_grad():
            for n, i in enumerate(self._steps()):
                if sampler == "ddpm":
                    x = self.ddpm_step(model, x, i, model_kwargs=model_kwargs, generator=generator)
                else:
                    x = self.ddim_step(model, x, i, eta=eta, model_kwargs=model_kwargs, generator=generator)
                if progress is not None:
                    progress(n + 1)
        return x

    def ddim_invert(self, model: Model, x0: torch.Tensor, *, model_kwargs: dict | None = None) -> torch.Tensor:
        """x_T such that deterministic DDIM from it returns ``x0`` (up to the discretisation error)."""
        x = x0
        with torch.no_grad():
            for i in range(self.num_steps):
                x = self.ddim_reverse_step(model, x, i, model_kwargs=model_kwargs)
        return x


def guided(model: Model, scale: float, *, uncond_kwargs: dict) -> Model:
    """Classifier-free guidance: ``out = uncond + scale * (cond - uncond)``, the conditional and the
    unconditional pass in one doubled batch. ``uncond_kwargs`` holds the keyword arguments that the
    unconditional half takes instead of the call's own (e.g. the dropped-caption mask); scale 1 is
    the conditional model, scale 0 the unconditional one."""

    def run(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if scale == 1.0:
            return model(x, t, **kwargs)
        extra = set(uncond_kwargs) - set(kwargs)
        if extra:
            raise TypeError(f"guided(): uncond_kwargs {sorted(extra)} are not arguments of the conditional call")
        both = {k: _cat(kwargs[k], uncond_kwargs.get(k, kwargs[k])) for k in kwargs}
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return uncond + scale * (cond - uncond)

    return run


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if a is None and b is None:
        return None
    raise TypeError("guided(): conditioning keyword arguments must be tensors batched like x")
