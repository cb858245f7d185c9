"""DDPM and DDIM noise schedulers (diffusers-style small classes; torch only, a leaf module).

A scheduler knows the noise process and nothing of networks (the network is the sampler's argument). A sampling loop
reads

    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), int(t), x, generator).prev_sample  # model: ε or v (`prediction_type`)

Every coefficient is precomputed once in float64 (`__init__`) and cast to the sample's dtype/device when used;
per-sample coefficients are broadcast to any rank by one helper, `expand_as_sample` (2D, 3D, ... all alike).

Notation (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"): β_t the noise schedule, α_t = 1 − β_t,
ᾱ_t = ∏_{s<=t} α_s. The network predicts ε (`prediction_type` "epsilon") or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0
("v_prediction", Salimans & Ho 2022); `pred_x0_and_eps` turns either into (x̂_0, ε̂), from which both posteriors work.

Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"): `rescale_betas_zero_snr` makes
ᾱ_T = 0 (the last training step is pure noise, as sampling from N(0, I) assumes; only v is defined there), and
"trailing" spacing starts sampling at t = T − 1. No coefficient divides by √ᾱ_t on the v path, so ᾱ_T = 0 is safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from voxdiff.config import BetaSchedule, SchedulerConfig, check_literal

__all__ = ["StepOutput", "expand_as_sample", "make_betas", "rescale_zero_terminal_snr", "DDPMScheduler",
           "DDIMScheduler", "make_scheduler"]


@dataclass
class StepOutput:
    """Result of one reverse step: x_{t_prev} and the model's estimate of x_0 at this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def expand_as_sample(coef: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample (B,) coefficient against `sample` (B, ...) of any rank (MONAI unsqueeze_right).

    Also casts to the sample's dtype and device, so float64 tables can be indexed on the CPU.
    """
    coef = coef.to(device=sample.device, dtype=sample.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (sample.ndim - 1)))


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, schedule: str) -> torch.Tensor:
    """β_1..β_T in float64: "linear" (DDPM §4: 1e-4 -> 0.02), "scaled_linear" (linear in √β, Stable Diffusion's) or
    "cosine" (Nichol & Dhariwal 2021 eq. 17, β<=0.999)."""
    check_literal(schedule, BetaSchedule, "beta_schedule")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    s = 0.008
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β rescaled so ᾱ_T = 0 exactly and ᾱ_1 is kept (Lin et al. 2024, Algorithm 1; diffusers' function).

    √ᾱ_t is shifted so its last value is 0 and scaled so its first is unchanged; β is recovered from the ratios
    ᾱ_t / ᾱ_{t−1}, which makes β_T = 1.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


class _Scheduler:
    """Shared tables, `set_timesteps` and `add_noise` of DDPM and DDIM."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config = config or SchedulerConfig()  # validated by the dataclass
        self.num_train_timesteps = config.num_train_timesteps
        # Precomputed once (float64): β_t, α_t, ᾱ_t and the forward-process square roots.
        self.betas = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule)
        if config.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # ᾱ before the first step: 1 (x_{-1} := x_0), so the last reverse step returns the x_0 estimate.
        self.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        self.set_timesteps(config.num_train_timesteps)
        # per-channel bound on the predicted x_0 (None: no clipping); see `set_clip`
        self.clip: torch.Tensor | None = None

    def set_clip(self, bound: torch.Tensor | None) -> None:
        """Clip every predicted x̂_0 to [−bound, bound] per channel (axis 1), e.g. the range of the training latents:
        large guidance scales can push x̂_0 outside anything the decoder saw (diffusers' `clip_sample`)."""
        self.clip = None if bound is None else torch.as_tensor(bound, dtype=torch.float64).reshape(-1)

    def _clipped(self, x0: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return x0
        b = self.clip.to(x0.device, x0.dtype).reshape(1, -1, *([1] * (x0.ndim - 2)))
        return torch.maximum(torch.minimum(x0, b), -b)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Use `num_inference_steps` timesteps, spaced by `config.timestep_spacing`: "leading" T−k, ..., k, 0 with
        k = T // n (DDIM's), or "trailing" round(T − i·T/n) − 1 for i = 0..n−1, i.e. T−1, ..., T/n − 1 (diffusers';
        the first step is the last trained one, which zero terminal SNR makes pure noise)."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"steps must be in 1..{T}; got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.step_ratio = T // num_inference_steps
        if self.config.timestep_spacing == "trailing":
            ratio = T / num_inference_steps
            steps = torch.arange(num_inference_steps, dtype=torch.float64)
            self.timesteps = (T - steps * ratio).round().long() - 1
            # each listed t steps to the next listed one (−1 after the last: ᾱ = 1); −2 marks t not in the list
            self._prev_timestep = torch.full((T,), -2, dtype=torch.long)
            self._prev_timestep[self.timesteps] = torch.cat([self.timesteps[1:], torch.tensor([-1])])
        else:
            self.timesteps = torch.arange(num_inference_steps, dtype=torch.long).flip(0) * self.step_ratio

    def previous_timestep(self, t: int | torch.Tensor) -> torch.Tensor:
        """t_prev of a reverse step from t (−1 or less: before the first step, ᾱ = 1): t − step_ratio with "leading"
        spacing, the next timestep of the list with "trailing" (whose gaps need not all be equal)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if self.config.timestep_spacing != "trailing":
            return t - self.step_ratio
        prev = self._prev_timestep[t]
        if bool((prev == -2).any()):
            raise ValueError(f"timestep {t.tolist()} is not one of the {self.num_inference_steps} trailing timesteps "
                             "set by set_timesteps")
        return prev

    def _alpha_cumprod_pair(self, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_{t_prev}) with t_prev = `previous_timestep(t)` (ᾱ of a negative index is 1)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        prev = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod)
        return a_t, a_prev

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process in closed form (DDPM eq. 4): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, per-sample t."""
        t = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        a = expand_as_sample(self.sqrt_alphas_cumprod[t], original_samples)
        s = expand_as_sample(self.sqrt_one_minus_alphas_cumprod[t], original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target of clean `sample` x_0 noised by ε at per-sample t: v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0
        (Salimans & Ho 2022 §4; diffusers' name and argument order)."""
        t = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        a = expand_as_sample(self.sqrt_alphas_cumprod[t], sample)
        s = expand_as_sample(self.sqrt_one_minus_alphas_cumprod[t], sample)
        return a * noise - s * sample

    def pred_x0_and_eps(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) of the network's output at x_t = `sample`, scalar or per-sample t, by `config.prediction_type`:
        ε: x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t, ε̂ = the output; v: x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂,
        ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t (no division: finite at ᾱ_t = 0)."""
        a_t = self.alphas_cumprod[torch.as_tensor(timestep, dtype=torch.long).cpu()]
        return self._x0_eps(model_output, sample, a_t)

    def _x0_eps(
        self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.prediction_type == "epsilon":
            return self._pred_x0(model_output, sample, a_t), model_output
        a, s = expand_as_sample(a_t.sqrt(), sample), expand_as_sample((1 - a_t).sqrt(), sample)
        return a * sample - s * model_output, a * model_output + s * sample

    def _eps_from_x0(self, x0: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t): divides by √(1 − ᾱ_t) only, which is >= √β_1 > 0 (also at ᾱ_T = 0)."""
        return (sample - expand_as_sample(a_t.sqrt(), sample) * x0) / expand_as_sample((1 - a_t).sqrt(), sample)

    def posterior(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, x̂_0) of p(x_{t_prev} | x_t) given the network's output (ε or v, see `pred_x0_and_eps`);
        `step` adds std · z to the mean."""
        raise NotImplementedError

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One reverse step x_t -> x_{t_prev}: the mean of `posterior` plus std · z, z ~ N(0, I) from `generator`."""
        mean, std, x0 = self.posterior(model_output, timestep, sample)
        if bool((std > 0).any()):
            dev = generator.device if generator is not None else sample.device
            z = torch.randn(sample.shape, generator=generator, device=dev, dtype=sample.dtype).to(sample.device)
            mean = mean + std * z
        return StepOutput(prev_sample=mean, pred_original_sample=x0)

    def _pred_x0(self, eps: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (DDPM eq. 15 solved for x_0; DDIM eq. 12's 'predicted x_0')."""
        return (sample - expand_as_sample((1 - a_t).sqrt(), sample) * eps) / expand_as_sample(a_t.sqrt(), sample)


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling with the "fixed small" variance σ_t² = β̃_t (DDPM eq. 7).

    With fewer inference steps than T, β is recomputed between the kept timesteps (β'_t = 1 − ᾱ_t / ᾱ_{t_prev}),
    as diffusers does; with all T steps this is exactly eq. 7.
    """

    def posterior(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # 1. ᾱ_t, ᾱ_{t_prev} and the effective β'_t, α'_t between them
        a_t, a_prev = self._alpha_cumprod_pair(timestep)
        beta_t = 1 - a_t / a_prev
        alpha_t = 1 - beta_t
        # 2. predicted x_0 from ε (eq. 15) or v, clipped to `clip` when set
        x0 = self._clipped(self._x0_eps(model_output, sample, a_t)[0])
        # 3. posterior mean coefficients of q(x_{t-1} | x_t, x_0) (eq. 7)
        c_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
        c_xt = alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
        # 4. posterior mean μ̃_t(x_t, x̂_0)
        mean = expand_as_sample(c_x0, sample) * x0 + expand_as_sample(c_xt, sample) * sample
        # 5. posterior variance β̃_t = (1 − ᾱ_{t-1}) / (1 − ᾱ_t) · β_t (eq. 7); 0 at the last step, 1 − ᾱ_{t-1} at a
        # zero-SNR first step (β'_t = 1)
        var = (1 - a_prev) / (1 - a_t) * beta_t
        return mean, expand_as_sample(var.clamp(min=0).sqrt(), sample), x0


class DDIMScheduler(_Scheduler):
    """DDIM sampling (DDIM eq. 12) with stochasticity η: η = 0 deterministic, η = 1 has DDPM's posterior variance."""

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 0.0) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1]; got {eta}")
        self.eta = float(eta)
        super().__init__(config)

    def posterior(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # 1. ᾱ_t and ᾱ_{t_prev}
        a_t, a_prev = self._alpha_cumprod_pair(timestep)
        # 2. "predicted x_0" (eq. 12, first term) and ε̂ from the output (ε or v); when clipped, ε̂ is re-derived from
        # the clipped x̂_0 (as diffusers)
        x0, eps = self._x0_eps(model_output, sample, a_t)
        if self.clip is not None:
            x0 = self._clipped(x0)
            eps = self._eps_from_x0(x0, sample, a_t)
        # 3. σ_t(η) = η √((1 − ᾱ_{t_prev}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t_prev}) (eq. 16)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = self.eta * var.clamp(min=0).sqrt()
        # 4. "direction pointing to x_t": √(1 − ᾱ_{t_prev} − σ_t²) · ε̂ (eq. 12, second term)
        dir_coef = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        # 5. x_{t_prev} = √ᾱ_{t_prev} · x̂_0 + direction (+ σ_t z, added by `step`)
        mean = expand_as_sample(a_prev.sqrt(), sample) * x0 + expand_as_sample(dir_coef, sample) * eps
        return mean, expand_as_sample(sigma, sample), x0


def make_scheduler(
    name: str, cfg: SchedulerConfig | None = None, steps: int | None = None, eta: float = 0.0
) -> DDPMScheduler | DDIMScheduler:
    """A "ddpm" or "ddim" scheduler for `cfg` with `steps` inference steps (None: all T for DDPM, 50 for DDIM)."""
    cfg = cfg or SchedulerConfig()
    if name == "ddpm":
        sched: DDPMScheduler | DDIMScheduler = DDPMScheduler(cfg)
        sched.set_timesteps(steps or cfg.num_train_timesteps)
    elif name == "ddim":
        sched = DDIMScheduler(cfg, eta=eta)
        sched.set_timesteps(steps or min(50, cfg.num_train_timesteps))
    else:
        raise ValueError(f"sampler must be one of ddpm, ddim; got {name!r}")
    return sched
