"""DDPM / DDIM schedulers against closed forms, hand-derived posteriors and an independent numpy re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxdiff.config import SchedulerConfig
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler, expand_as_sample, make_betas, make_scheduler


def _np_tables(T: int = 1000, b0: float = 1e-4, b1: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    alphas = 1.0 - betas
    return betas, alphas, np.cumprod(alphas)


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4, 4), (3, 16, 4, 4, 4)])
def test_expand_as_sample_is_rank_agnostic(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = expand_as_sample(c, x) * x
    for i in range(3):
        assert torch.allclose(out[i], x[i] * (i + 1))
    assert expand_as_sample(torch.tensor(2.0), x).ndim == 0


def test_forward_process_matches_its_closed_form() -> None:
    # Iterating q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I) gives x_t = m_t x_0 + (noise of variance v_t): the recursion
    # m_t = √α_t m_{t-1}, v_t = α_t v_{t-1} + β_t must equal the closed form √ᾱ_t, 1 − ᾱ_t (DDPM eq. 4).
    s = DDPMScheduler()
    betas, alphas, _ = _np_tables()
    m, v = 1.0, 0.0
    ms, vs = [], []
    for a, b in zip(alphas, betas):
        m, v = np.sqrt(a) * m, a * v + b
        ms.append(m)
        vs.append(v)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), ms, rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy() ** 2, vs, rtol=1e-10)
    # Monte Carlo: simulate the chain step by step for T = 100 and compare with add_noise's moments.
    s100 = DDPMScheduler(SchedulerConfig(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((50_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(100):
        x = s100.alphas[t].sqrt() * x + s100.betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = s100.add_noise(x0, torch.randn(x.shape, generator=g, dtype=torch.float64), torch.full((len(x0),), 99))
    assert abs(float(x.mean() - closed.mean())) < 0.02
    assert abs(float(x.var() / closed.var()) - 1) < 0.04


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 5, 5), (4, 16, 4, 4, 4)])
def test_add_noise_per_sample_timesteps(shape: tuple[int, ...]) -> None:
    s = DDPMScheduler()
    x0, eps = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0, 10, 500, 999])
    out = s.add_noise(x0, eps, t)
    _, _, ab = _np_tables()
    for i, ti in enumerate(t.tolist()):
        ref = np.sqrt(ab[ti]) * x0[i].numpy() + np.sqrt(1 - ab[ti]) * eps[i].numpy()
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 37, 500, 999])
def test_ddpm_posterior_matches_bayes_rule(t: int) -> None:
    # q(x_{t-1} | x_t, x_0) from Gaussian conditioning (product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0)):
    # precision = α_t/β_t + 1/(1 − ᾱ_{t-1}); mean = var · (√α_t x_t / β_t + √ᾱ_{t-1} x_0 / (1 − ᾱ_{t-1})).
    s = DDPMScheduler()
    betas, alphas, ab = _np_tables()
    g = torch.Generator().manual_seed(t)
    xt = torch.randn(2, 16, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(xt.shape, generator=g, dtype=torch.float64)
    mean, std, x0 = s.posterior(eps, t, xt)
    x0_hand = (xt.numpy() - np.sqrt(1 - ab[t]) * eps.numpy()) / np.sqrt(ab[t])
    var_hand = 1.0 / (alphas[t] / betas[t] + 1.0 / (1 - ab[t - 1]))
    mean_hand = var_hand * (np.sqrt(alphas[t]) * xt.numpy() / betas[t] + np.sqrt(ab[t - 1]) * x0_hand / (1 - ab[t - 1]))
    np.testing.assert_allclose(x0.numpy(), x0_hand, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mean.numpy(), mean_hand, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(float(std) ** 2, var_hand, rtol=1e-9)


def test_ddpm_last_step_returns_x0_without_noise() -> None:
    s = DDPMScheduler()
    xt, eps = torch.randn(3, 4), torch.randn(3, 4)
    out = s.step(eps, 0, xt, torch.Generator().manual_seed(0))
    assert torch.equal(out.prev_sample, out.pred_original_sample)


def test_ddim_eta0_is_deterministic_given_initial_noise() -> None:
    s = DDIMScheduler(eta=0.0)
    s.set_timesteps(20)
    x_T = torch.randn(2, 16, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(gen_seed: int) -> torch.Tensor:
        x, g = x_T.clone(), torch.Generator().manual_seed(gen_seed)
        for t in s.timesteps:
            x = s.step(0.3 * x + 0.001 * float(t), int(t), x, g).prev_sample
        return x

    assert torch.equal(run(0), run(123))
    assert not torch.equal(run(0), x_T)


@pytest.mark.parametrize("t", [1, 250, 999])
def test_ddim_eta1_over_all_steps_has_ddpm_posterior(t: int) -> None:
    ddpm, ddim = DDPMScheduler(), DDIMScheduler(eta=1.0)
    ddim.set_timesteps(1000)
    g = torch.Generator().manual_seed(t)
    xt = torch.randn(3, 16, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(xt.shape, generator=g, dtype=torch.float64)
    m1, s1, _ = ddpm.posterior(eps, t, xt)
    m2, s2, _ = ddim.posterior(eps, t, xt)
    torch.testing.assert_close(m2, m1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s2, s1, rtol=1e-9, atol=1e-12)
    # and one full step with the same noise draw lands on the same point
    a = ddpm.step(eps, t, xt, torch.Generator().manual_seed(5)).prev_sample
    b = ddim.step(eps, t, xt, torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_set_timesteps_leading_spacing() -> None:
    s = make_scheduler("ddim", SchedulerConfig(), steps=50)
    assert s.timesteps[0] == 980 and s.timesteps[-1] == 0 and len(s.timesteps) == 50
    assert make_scheduler("ddpm").timesteps.tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="eta"):
        DDIMScheduler(eta=1.5)


# ---- full loops vs an independent numpy re-implementation (seeded: one pinned trajectory per scheduler) ------------


def _fake_eps(x: np.ndarray, t: int) -> np.ndarray:
    return 0.5 * np.tanh(x) + 1e-4 * t


def _np_loop(sampler: str, steps: int, eta: float, x_T: np.ndarray, zs: list[np.ndarray]) -> np.ndarray:
    _, _, ab = _np_tables()
    k = 1000 // steps
    x, zi = x_T, 0
    for t in range(1000 - k, -1, -k):
        a_t = ab[t]
        a_p = ab[t - k] if t - k >= 0 else 1.0
        e = _fake_eps(x, t)
        x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        if sampler == "ddpm":  # DDPM eq. 7 with β'_t = 1 − ᾱ_t / ᾱ_prev
            b = 1 - a_t / a_p
            mean = np.sqrt(a_p) * b / (1 - a_t) * x0 + np.sqrt(1 - b) * (1 - a_p) / (1 - a_t) * x
            sd = np.sqrt((1 - a_p) / (1 - a_t) * b)
        else:  # DDIM eq. 12 with σ from eq. 16
            sd = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            mean = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sd**2) * e
        if sd > 0:
            x = mean + sd * zs[zi]
            zi += 1
        else:
            x = mean
    return x


@pytest.mark.parametrize(("sampler", "steps", "eta"), [("ddpm", 1000, 0.0), ("ddim", 50, 0.5), ("ddim", 25, 0.0)])
def test_full_loop_matches_numpy(sampler: str, steps: int, eta: float) -> None:
    shape = (2, 1, 3, 3, 3)
    sched = make_scheduler(sampler, SchedulerConfig(), steps=steps, eta=eta)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(shape, generator=g)
    x_T = x.double().numpy()
    for t in sched.timesteps:
        eps = torch.from_numpy(_fake_eps(x.double().numpy(), int(t))).float()
        x = sched.step(eps, int(t), x, g).prev_sample
    # the same noise stream, drawn independently: x_T then one z per noisy step
    g2 = torch.Generator().manual_seed(42)
    torch.randn(shape, generator=g2)
    noisy = steps - 1 if (sampler == "ddpm" or eta > 0) else 0
    zs = [torch.randn(shape, generator=g2).double().numpy() for _ in range(noisy)]
    ref = _np_loop(sampler, steps, eta, x_T, zs)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("sampler", "steps", "eta"), [("ddpm", 1000, 0.0), ("ddpm", 37, 0.0), ("ddim", 50, 0.0),
                                                       ("ddim", 20, 1.0)])
def test_oracle_eps_recovers_x0_exactly(sampler: str, steps: int, eta: float) -> None:
    """With the true ε of the current sample, ε* = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), every reverse loop (DDPM's noisy
    steps included) must land on x_0: the last step returns the x_0 estimate, which is x_0 itself. float64, 3D."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 4, 4, 4, generator=g, dtype=torch.float64)
    sched = make_scheduler(sampler, SchedulerConfig(), steps, eta)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t in sched.timesteps:
        a = sched.alphas_cumprod[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = sched.step(eps, int(t), x, g).prev_sample
    assert float((x - x0).abs().max()) < 1e-12


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clipped_x0_stays_in_range_and_a_wide_clip_changes_nothing(sampler: str) -> None:
    """set_clip bounds every predicted x̂_0 per channel (DDIM re-derives ε from the clipped x̂_0, as diffusers); a
    bound no prediction reaches leaves the loop bit-identical."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 4, 4, 4, generator=g), 3 * torch.randn(2, 3, 4, 4, 4, generator=g)
    sched = make_scheduler(sampler, SchedulerConfig(), 10)
    t = int(sched.timesteps[3])
    free = sched.step(eps, t, x, torch.Generator().manual_seed(1))
    sched.set_clip(torch.tensor([0.5, 1.0, 2.0]))
    out = sched.step(eps, t, x, torch.Generator().manual_seed(1))
    bound = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1, 1)
    assert (out.pred_original_sample.abs() <= bound + 1e-6).all() and not torch.equal(out.prev_sample, free.prev_sample)
    sched.set_clip(torch.full((3,), 1e6))
    wide = sched.step(eps, t, x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(wide.prev_sample, free.prev_sample, rtol=1e-6, atol=1e-6)


# ---- scaled_linear, zero terminal SNR, trailing spacing, v-prediction ------------------------------------------------


def _v_cfg(**kw) -> SchedulerConfig:
    return SchedulerConfig(prediction_type="v_prediction", **kw)


def test_scaled_linear_betas_are_linear_in_sqrt_beta() -> None:
    """diffusers' scaled_linear: β = linspace(√β_start, √β_end, T)²; its ends are β_start and β_end."""
    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    ref = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), ref, rtol=1e-12, atol=0)
    assert float(betas[0]) == pytest.approx(0.00085, rel=1e-12) and float(betas[-1]) == pytest.approx(0.012, rel=1e-12)
    s = DDPMScheduler(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - ref), rtol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(schedule: str) -> None:
    """Lin et al. 2024, Algorithm 1: ᾱ_T = 0 exactly, ᾱ_1 kept, and √ᾱ_t an affine map of the original √ᾱ_t."""
    plain = DDPMScheduler(SchedulerConfig(beta_schedule=schedule))
    zero = DDPMScheduler(_v_cfg(beta_schedule=schedule, rescale_betas_zero_snr=True))
    ab, ab0 = zero.alphas_cumprod.numpy(), plain.alphas_cumprod.numpy()
    assert ab[-1] == 0.0 and float(zero.betas[-1]) == 1.0 and float(zero.sqrt_alphas_cumprod[-1]) == 0.0
    assert ab[0] == pytest.approx(ab0[0], rel=1e-12)  # the first step is unchanged
    assert (np.diff(ab) < 0).all() and ((zero.betas > 0) & (zero.betas <= 1)).all()
    s0 = np.sqrt(ab0)
    ref = (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1])
    np.testing.assert_allclose(np.sqrt(ab), ref, rtol=1e-9, atol=1e-12)
    assert ab0[-1] > 0  # the original schedules never reach pure noise: what the rescale fixes


def test_trailing_timesteps_and_their_previous_steps() -> None:
    """diffusers' trailing: round(arange(T, 0, −T/n)) − 1, so T = 1000, n = 50 is 999, 979, ..., 19; each step goes
    to the next listed timestep and the last to ᾱ = 1 (x_0)."""
    s = make_scheduler("ddim", SchedulerConfig(timestep_spacing="trailing"), steps=50)
    ts = s.timesteps.tolist()
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50 and set(np.diff(ts)) == {-20}
    assert ts == (np.round(np.arange(1000, 0, -1000 / 50)) - 1).astype(int).tolist()
    for n in (50, 37, 1000, 1):  # 37: unequal gaps, the previous step must still be the next listed one
        s.set_timesteps(n)
        ts = s.timesteps.tolist()
        assert len(ts) == n and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
        for i, t in enumerate(ts):
            a_t, a_prev = s._alpha_cumprod_pair(t)
            assert float(a_t) == float(s.alphas_cumprod[t])
            assert float(a_prev) == (float(s.alphas_cumprod[ts[i + 1]]) if i + 1 < n else 1.0)
        _, a_prev = s._alpha_cumprod_pair(torch.tensor(ts))  # per-sample timesteps alike
        assert a_prev.tolist() == [float(s.alphas_cumprod[t]) for t in ts[1:]] + [1.0]
    s.set_timesteps(37)
    with pytest.raises(ValueError, match="not one of the 37 trailing timesteps"):
        s.step(torch.zeros(1, 2), 500, torch.zeros(1, 2))
    assert make_scheduler("ddpm", SchedulerConfig(timestep_spacing="trailing")).timesteps.tolist() == \
        list(range(999, -1, -1))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_round_trip(zero_snr: bool) -> None:
    """x_0, ε -> x_t, v = √ᾱ ε − √(1−ᾱ) x_0 -> (x̂_0, ε̂) gives back x_0 and ε (float64), at ᾱ_T = 0 too."""
    s = DDIMScheduler(_v_cfg(rescale_betas_zero_snr=zero_snr))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 998, 999])
    xt = s.add_noise(x0, eps, t)
    v = s.get_velocity(x0, eps, t)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=0, atol=1e-12)
    x0_hat, eps_hat = s.pred_x0_and_eps(v, t, xt)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-6)
    for i, ti in enumerate(t.tolist()):  # a scalar timestep gives the same
        xi, ei = s.pred_x0_and_eps(v[i : i + 1], ti, xt[i : i + 1])
        torch.testing.assert_close(xi, x0_hat[i : i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(ei, eps_hat[i : i + 1], rtol=0, atol=1e-12)
    if zero_snr:  # at ᾱ_T = 0 the sample is pure noise and v = −x_0
        assert torch.equal(xt[-1], eps[-1]) and torch.equal(v[-1], -x0[-1])
    # ε-prediction: the helper passes ε through and solves for x_0
    se = DDIMScheduler()
    x0_e, eps_e = se.pred_x0_and_eps(eps, t, se.add_noise(x0, eps, t))
    assert eps_e is eps
    torch.testing.assert_close(x0_e, x0, rtol=0, atol=1e-6)


_ORACLE_CASES = [(sampler, steps, eta, pred, spacing, zero)
                 for sampler, steps, eta in [("ddim", 50, 0.0), ("ddim", 37, 0.0), ("ddim", 20, 1.0), ("ddpm", 37, 0.0)]
                 for pred in ("epsilon", "v_prediction") for spacing in ("leading", "trailing")
                 for zero in (False, True) if not (zero and pred == "epsilon")]


@pytest.mark.parametrize(("sampler", "steps", "eta", "pred", "spacing", "zero"), _ORACLE_CASES)
def test_oracle_recovers_x0_for_every_prediction_type_and_spacing(sampler: str, steps: int, eta: float, pred: str,
                                                                  spacing: str, zero: bool) -> None:
    """A perfect model (the true ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0, of the current sample for a known x_0) must bring
    every reverse loop to x_0, with zero terminal SNR (first step at ᾱ = 0 with trailing spacing) too; every
    intermediate sample stays finite. float64, 3D."""
    cfg = SchedulerConfig(prediction_type=pred, timestep_spacing=spacing, rescale_betas_zero_snr=zero)
    sched = make_scheduler(sampler, cfg, steps, eta)
    if zero and spacing == "trailing":
        assert float(sched.alphas_cumprod[int(sched.timesteps[0])]) == 0.0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 4, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t in sched.timesteps:
        a = sched.alphas_cumprod[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if pred == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        step = sched.step(out, int(t), x, g)
        x = step.prev_sample
        assert torch.isfinite(x).all() and torch.isfinite(step.pred_original_sample).all()
    assert float((x - x0).abs().max()) < 1e-10


def test_zero_snr_first_step_is_finite_in_both_posteriors() -> None:
    """At ᾱ_t = 0 (trailing, zero SNR): DDPM's β'_t = 1, so its variance is 1 − ᾱ_prev (finite); x̂_0 = −v̂; and the
    clipped path re-derives ε̂ = x_t (no division by √ᾱ_t anywhere)."""
    cfg = _v_cfg(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    for sched in (make_scheduler("ddpm", cfg, 50), make_scheduler("ddim", cfg, 50, eta=1.0)):
        t = int(sched.timesteps[0])
        a_prev = sched.alphas_cumprod[int(sched.timesteps[1])]
        mean, std, x0 = sched.posterior(v, t, x)
        assert torch.equal(x0, -v) and torch.isfinite(mean).all()
        assert float(std) == pytest.approx(float((1 - a_prev).sqrt()), rel=1e-12)
        torch.testing.assert_close(mean, a_prev.sqrt() * -v, rtol=1e-12, atol=1e-12)
        sched.set_clip(torch.full((3,), 0.5))
        mean_c, _, x0_c = sched.posterior(v, t, x)
        assert torch.isfinite(mean_c).all() and (x0_c.abs() <= 0.5).all()
        torch.testing.assert_close(mean_c, a_prev.sqrt() * x0_c, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(sched.pred_x0_and_eps(v, t, x)[1]).all()
