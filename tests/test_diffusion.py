"""The diffusion process (schedules, q_sample, parametrisations, samplers with oracle models), the
DiT denoiser (shape, zero init, no mixing across samples), and the whole loop memorising a few rows."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from raywsl.models.dit import EMA, MODELS, make_dit
from raywsl.models.gaussian import DiffusionSettings, GaussianDiffusion, bucket_losses, cosine_betas

PREDICTIONS = ["eps", "x0", "v"]


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from a second thread, and on a busy 2-core machine two threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- schedules

def test_linear_schedule_matches_closed_form():
    d = GaussianDiffusion(DiffusionSettings(steps=500))
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(2e-2)
    betas = np.linspace(1e-4, 2e-2, 500)
    for t in (0, 1, 100, 250, 499):
        assert d.alphas_cumprod[t].item() == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    assert d.alphas_cumprod_prev[0] == 1 and d.posterior_var[0] == 0


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    d = GaussianDiffusion(DiffusionSettings(steps=T, schedule="cosine"))
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 300, 700, 950):  # abar_t = f(t + 1) / f(0) wherever no beta was clipped before t
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(T).max().item() == pytest.approx(0.999)  # the last betas are clipped


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="linear"):
        GaussianDiffusion(DiffusionSettings(schedule="quadratic"))
    with pytest.raises(ValueError, match="eps"):
        GaussianDiffusion(DiffusionSettings(prediction="score"))
    with pytest.raises(ValueError, match="tiny"):
        make_dit("huge", 8)


def test_q_sample_statistics():
    d = GaussianDiffusion(DiffusionSettings(steps=500))
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (0, 50, 250, 499):
        abar = d.alphas_cumprod[t].item()
        tt = torch.full((n,), t)
        zero = d.q_sample(torch.zeros(n, 1), tt, torch.randn(n, 1, generator=gen))
        assert zero.var().item() == pytest.approx(1 - abar, rel=0.02)
        const = d.q_sample(torch.full((n, 1), 2.0), tt, torch.randn(n, 1, generator=gen))
        assert const.mean().item() == pytest.approx(2 * math.sqrt(abar), abs=0.01)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_split_inverts_target(prediction):
    d = GaussianDiffusion(DiffusionSettings(steps=500, prediction=prediction))
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(500, 32, generator=gen), torch.randn(500, 32, generator=gen)
    t = torch.arange(500)
    x0_hat, eps_hat = d.split(d.target(x0, noise, t), d.q_sample(x0, t, noise), t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- samplers

def oracle(d: GaussianDiffusion, c: torch.Tensor):
    """The exact model for the data distribution {c}: the target given that x0 = c."""
    def model(x_t, t):
        a, b = d.alphas_cumprod[t].sqrt().float()[:, None], (1 - d.alphas_cumprod[t]).sqrt().float()[:, None]
        eps = (x_t - a * c) / b
        return d.target(c.expand_as(x_t), eps, t)
    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_samplers_with_an_oracle_return_the_point(prediction):
    d = GaussianDiffusion(DiffusionSettings(steps=200, prediction=prediction))
    c = torch.randn(24, generator=torch.Generator().manual_seed(2))
    model = oracle(d, c)
    x = d.ddim_sample(model, (4, 24), steps=50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, c.expand(4, -1), atol=1e-4, rtol=0)
    x = d.ddim_sample(model, (4, 24), steps=50, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, c.expand(4, -1), atol=1e-4, rtol=0)
    x = d.ancestral_sample(model, (4, 24), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x, c.expand(4, -1), atol=1e-4, rtol=0)


def test_samplers_reproduce_gaussian_data():
    """Data N(mu, s^2 I) has an exact denoiser, E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu):
    the samplers must return mean mu and spread s (DDIM up to its discretisation error), and DDIM
    over all T steps with eta = 1 is DDPM's ancestral sampler, noise draw for noise draw."""
    d, mu, s = GaussianDiffusion(DiffusionSettings(steps=1000)), 1.0, 0.5

    def model(x_t, t):
        a, b = d.alphas_cumprod[t].sqrt().float()[:, None], (1 - d.alphas_cumprod[t]).sqrt().float()[:, None]
        x0 = mu + a * s ** 2 / (a ** 2 * s ** 2 + b ** 2) * (x_t - a * mu)
        return d.target(x0, (x_t - a * x0) / b, t)

    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ancestral = d.ancestral_sample(model, (2000, 8), generator=seed())
    ddim = d.ddim_sample(model, (2000, 8), steps=200, generator=seed())
    for x in (ancestral, ddim):
        assert x.mean().item() == pytest.approx(mu, abs=0.02) and x.std().item() == pytest.approx(s, abs=0.015)
    torch.testing.assert_close(d.ddim_sample(model, (2000, 8), steps=1000, eta=1.0, generator=seed()), ancestral,
                               atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_clip_bounds_x0():
    d = GaussianDiffusion(DiffusionSettings(steps=50))
    model = oracle(d, torch.full((8,), 3.0))
    a = d.ddim_sample(model, (2, 8), steps=10, eta=0.5, generator=torch.Generator().manual_seed(0))
    b = d.ddim_sample(model, (2, 8), steps=10, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    clipped = d.ddim_sample(model, (2, 8), steps=10, generator=torch.Generator().manual_seed(0), clip=1.0)
    torch.testing.assert_close(clipped, torch.ones(2, 8), atol=1e-4, rtol=0)


def test_bucket_losses_counts():
    t = torch.tensor([0, 5, 9, 10, 55, 99, 99])
    out = bucket_losses(t, torch.arange(7.0), 100, buckets=10)
    assert list(out)[:2] == ["t000-009", "t010-019"] and len(out) == 10
    assert out["t000-009"] == (1.0, 3) and out["t010-019"] == (3.0, 1) and out["t090-099"] == (5.5, 2)
    assert out["t020-029"][1] == 0 and math.isnan(out["t020-029"][0])
    assert sum(n for _, n in out.values()) == 7


# ------------------------------------------------------------------------------- the DiT

def test_dit_shape_zero_init_and_no_mixing(one_thread):
    torch.manual_seed(0)
    model = make_dit("tiny", 6)
    assert set(MODELS) >= {"tiny", "small", "base", "hyperdiffusion"}
    x, t = torch.randn(3, 6, 64), torch.tensor([0, 10, 99])
    out = model(x, t)
    assert out.shape == (3, 6, 64) and torch.equal(out, torch.zeros_like(out))
    # a few steps make the output non-zero and t-dependent (the first only moves the final Linear)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = (model(x, t) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(x, t)
    assert out.abs().max() > 0
    assert not torch.allclose(model(x[:1], torch.tensor([0])), model(x[:1], torch.tensor([99])))
    # perturbing sample 0 leaves sample 1 unchanged
    y = x.clone()
    y[0] += torch.randn(6, 64)
    moved = model(y, t)
    assert not torch.allclose(moved[0], out[0]) and torch.equal(moved[1:], out[1:])


def test_ema_warm_up_and_state():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model)  # decay 0.1 at the first update: mostly the new weights
    torch.testing.assert_close(ema.model.weight, 0.1 * before + 0.9 * model.weight)
    other = EMA(nn.Linear(2, 2))
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.99 and torch.equal(other.model.weight, ema.model.weight)


# ------------------------------------------------------------------------------- the whole loop

class Denoiser(nn.Module):
    """A trivial fixed tokenization for the test: rows (B, P) -> (B, n, P / n) -> Linear -> DiT -> back."""

    def __init__(self, P: int, n: int):
        super().__init__()
        self.n, self.dit = n, make_dit("tiny", n)
        self.inp, self.out = nn.Linear(P // n, 64), nn.Linear(64, P // n)

    def forward(self, x, t):
        b, p = x.shape
        return self.out(self.dit(self.inp(x.view(b, self.n, p // self.n)), t)).reshape(b, p)


def test_training_memorises_a_few_rows(one_thread):
    """800 AdamW steps on 8 rows (x0 prediction, HyperDiffusion's; eps needs several times more steps
    on this budget): every DDIM sample lands on a training row, far closer than rows are to each other."""
    torch.manual_seed(0)
    P, n_rows = 128, 8
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n_rows, P, generator=gen)
    rows = (rows - rows.mean(0)) / rows.std(0)  # standardised per column, as the store's rows will be
    d = GaussianDiffusion(DiffusionSettings(steps=500, prediction="x0"))
    model = Denoiser(P, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch = rows.repeat(8, 1)  # 64 (row, t, noise) draws a step
    for _ in range(800):
        loss, _ = d.training_losses(model, batch, generator=gen)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # not flat across t: x0 is easy to read off x_t at low t, a guess among rows at high t
        loss, t = d.training_losses(model, rows.repeat(64, 1), generator=gen)
    buckets = bucket_losses(t, loss, d.T)
    low, high = buckets["t000-049"][0], buckets["t450-499"][0]
    assert low < 0.1 * high, buckets
    samples = d.ddim_sample(model, (16, P), steps=50, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(samples, rows)
    nearest = dist.min(1).values
    between = torch.cdist(rows, rows)[~torch.eye(n_rows, dtype=torch.bool)].median()  # ~ sqrt(2 P) = 16
    assert (nearest < 0.2 * between).all(), f"nearest training row {nearest.tolist()}, rows {between:.2f} apart"
    assert len(set(dist.argmin(1).tolist())) >= 3  # not all on one row: the modes are covered
    print(f"nearest {nearest.max():.2f} max, {nearest.median():.2f} median; rows {between:.2f} apart; "
          f"rows hit {len(set(dist.argmin(1).tolist()))}; buckets {low:.4f} (t < 50) {high:.4f} (t >= 450)")
