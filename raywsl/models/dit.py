"""The denoiser: a DiT (Peebles & Xie) over a shape's weight tokens, and an EMA of its weights.

    model = make_dit("small", n_tokens=T)          # or DiT(n_tokens, dim, depth, heads)
    out = model(tokens, t)                         # tokens (B, T, dim), t (B,) timesteps -> (B, T, dim)
    ema = EMA(model) ; ema.update(model)           # after each optimiser step; sample with ema.model

The tokenizer maps rows (B, P) to tokens (B, T, dim) and back, so the DiT has no patch embedding:
tokens in, tokens out, same width. Each token gets a learned positional embedding (a token is a
fixed slice of the weights, so its position says which weights it holds); the timestep goes through
a sinusoidal embedding and an MLP to a conditioning vector c, which modulates every block by
adaLN-Zero (shift, scale and gate for attention and MLP, regressed from c). The modulation Linears
and the final Linear start at zero, so every block starts as the identity and an untrained model
outputs zeros, the mean of the targets (eps, x0 or v of standardised rows) and a safe start.

Samples never mix: attention runs within a sample's tokens, LayerNorm within a token.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Model sizes. "hyperdiffusion" is the transformer of HyperDiffusion (from G.pt): 2880 wide, 12 x 16 heads.
MODELS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, heads=4),  # CPU tests
    "small": dict(dim=256, depth=4, heads=4),
    "base": dict(dim=512, depth=8, heads=8),
    "large": dict(dim=1024, depth=12, heads=16),
    "hyperdiffusion": dict(dim=2880, depth=12, heads=16),
    "latent": dict(dim=384, depth=4, heads=6),  # the small-data study's latent DiT (papers/002, section 6)
}

FREQ_DIM = 256  # width of the sinusoidal timestep features (DiT's)


def timestep_features(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) of timesteps t (B,), integer or float (DiT / DDPM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block whose norms are modulated by c (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # affine comes from c
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # gates start at 0: the block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Denoiser over tokens: (B, T, dim) tokens and (B,) timesteps -> (B, T, dim)."""

    def __init__(self, n_tokens: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.config = dict(n_tokens=n_tokens, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)  # small: tokens tell apart from step 0
        self.time = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, dim)
        for lin in (self.ada[1], self.out):  # DiT's final layer: zero, so the model starts at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens: Tensor, t: Tensor) -> Tensor:
        c = self.time(timestep_features(t).to(tokens.dtype))
        x = tokens + self.pos
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm(x), shift, scale))


def make_dit(name: str, n_tokens: int) -> DiT:
    """The DiT of size `name` (a key of MODELS) over n_tokens tokens."""
    if name not in MODELS:
        raise ValueError(f"unknown DiT size {name!r}; known: {', '.join(MODELS)}")
    model = DiT(n_tokens, **MODELS[name])
    model.model_name = name
    return model


class EMA:
    """Exponential moving average of a model's weights, with a warm-up: the decay is
    min(decay, (1 + n) / (10 + n)) at update n, so a short run's EMA is not mostly the initial weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
