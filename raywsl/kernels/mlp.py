"""The fitting step of a batch of ReLU MLP fields, fused in Triton: gradient and loss of B shapes'
weight rows at once.

    grad, per_shape = loss_and_grad(rows, x, y, spec)   # rows (B, P), x (B, K, 3), y (B, K)

`spec` (an MLPSpec) describes the field: the positional encoding's bands, the hidden width, the
hidden layers, the loss. A row is the flat concatenation l0.weight (H, D0), l0.bias (H), l1.weight
(H, H), ..., l<N>.weight (1, H), l<N>.bias (1) of `raywsl.models.fields.linear_stack` with torch's
nn.Linear convention (W is (out, in)), D0 = 3 + 6 bands. The result is what
`torch.func.grad` of the sum of per-shape mean losses gives (the fitting engine's torch path).

Two kernels, the tiny-cuda-nn split:

1. `_forward_backward`, one program per (shape, block of BM points): positional encoding, every
   layer's matmul + ReLU, the output, the loss and its derivative, then back through the layers to
   each layer's pre-activation gradient dZ_i, all in one pass with the weights read once per block
   and nothing but what the weight gradients need written out: the encoding, the hidden outputs H_i
   but the last, and the dZ_i (bf16 when `half`). The output
   layer's gradient and the per-block loss sums are reduced inside the program.
2. `_weight_grad`, one program per (shape, layer, output tile): dW_i = dZ_i^T H_{i-1} and
   db_i = sum dZ_i, reduced over the K points with fp32 accumulation and written straight into the
   (B, P) gradient at the layer's offset.

Sums are over fixed blocks in a fixed order (no atomics), so a shape's gradient does not depend on
the run or on which shapes share its batch. Indices into the (layers, B, K, H) scratch are int64:
at B = 1024, K = 8192 it holds over 2^31 elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raywsl.kernels import check, interpreted

LOSS_IDS = {"l1": 0, "clamped_l1": 1, "mse": 2, "bce": 3}


@dataclass(frozen=True)
class MLPSpec:
    """What the kernel needs to know of an MLP field and its loss."""

    bands: int  # positional-encoding bands: D0 = 3 + 6 bands inputs
    hidden: int  # width H of every hidden layer (a power of two >= 16: tl.dot's tiles)
    layers: int  # hidden layers N: N + 1 linear layers
    loss: str = "l1"
    clamp: float = 0.1  # clamped_l1's delta
    half: bool = False  # bf16 matmul inputs and scratch (fp32 accumulation); else fp32

    @property
    def d_in(self) -> int:
        return 3 + 6 * self.bands

    @property
    def size(self) -> int:
        h, d0, n = self.hidden, self.d_in, self.layers
        return h * d0 + h + (n - 1) * (h * h + h) + h + 1

    def validate(self) -> None:
        h = self.hidden
        if h < 16 or h & (h - 1):
            raise ValueError(f"fused MLP kernel: hidden width {h} must be a power of two >= 16")
        if self.layers < 1:
            raise ValueError(f"fused MLP kernel: {self.layers} hidden layers; it needs at least one")
        if self.loss not in LOSS_IDS:
            raise ValueError(f"fused MLP kernel: loss {self.loss!r} is not one of {list(LOSS_IDS)}")


@dataclass(frozen=True)
class Tuning:
    """Block sizes and warps (per device; tuned on a GPU, see benchmarks/gpu)."""

    block_points: int = 64  # BM: points per program of the forward-backward kernel
    warps: int = 4
    block_k: int = 64  # points per step of the weight-gradient reduction
    weight_warps: int = 4


# ------------------------------------------------------------------------------------ kernels


@triton.jit
def _dot(a, b, HALF: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: bf16 inputs when HALF, else fp32 (exact in IEEE, TF32 otherwise).
    HALF and IEEE together (the interpreter, whose bf16 dot is wrong in triton 3.9): the inputs rounded
    to bf16, multiplied in fp32, which is what the tensor cores compute."""
    if HALF and IEEE:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif HALF:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _forward_backward(
    rows_ptr, x_ptr, y_ptr,  # (B, P) fp32, (B, K, 3) fp32, (B, K) fp32
    pe_ptr, act_ptr, dz_ptr,  # scratch: (B, K, D0P), (N - 1, B, K, H), (N, B, K, H)
    last_ptr, loss_ptr,  # per block: (B, NB, H + 1) output-layer gradient, (B, NB) loss sums
    B, K, P, NB, clamp,
    BANDS: tl.constexpr, D0: tl.constexpr, D0P: tl.constexpr, H: tl.constexpr, N: tl.constexpr,
    LOSS: tl.constexpr, HALF: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    m = blk * BM + tl.arange(0, BM)
    live = m < K
    hcol = tl.arange(0, H)
    row = rows_ptr + b * P
    act_t = act_ptr.dtype.element_ty

    # Positional encoding [x, sin(2^k x), cos(2^k x)] (x-major within sin and cos), zero-padded to D0P.
    j = tl.arange(0, D0P)
    q = tl.where(j < 3, j, tl.where(j < 3 + 3 * BANDS, j - 3, j - 3 - 3 * BANDS))
    coord = tl.where(j < 3, j, q // BANDS)
    freq = tl.exp2((q % BANDS).to(tl.float32))
    xc = tl.load(x_ptr + b * K * 3 + m[:, None] * 3 + coord[None, :], mask=live[:, None] & (j < D0)[None, :],
                 other=0.0)
    h = tl.where((j < 3)[None, :], xc, tl.where((j < 3 + 3 * BANDS)[None, :], tl.sin(xc * freq[None, :]),
                                                 tl.cos(xc * freq[None, :])))
    h = tl.where((j < D0)[None, :], h, 0.0)
    tl.store(pe_ptr + b * K * D0P + m[:, None] * D0P + j[None, :], h.to(act_t), mask=live[:, None])

    # Forward: Z_i = H_{i-1} W_i^T + b_i, H_i = relu(Z_i); H_i kept in the scratch for the backward pass and
    # the weight gradients. Layer 0 reads D0 of its D0P padded inputs.
    w0t = tl.load(row + hcol[None, :] * D0 + j[:, None], mask=(j < D0)[:, None], other=0.0)  # (D0P, H) = W0^T
    h = tl.maximum(_dot(h, w0t, HALF, IEEE) + tl.load(row + H * D0 + hcol)[None, :], 0.0)
    if N > 1:
        tl.store(act_ptr + b * K * H + m[:, None] * H + hcol[None, :], h.to(act_t), mask=live[:, None])
    for i in tl.static_range(1, N):
        w = row + H * D0 + H + (i - 1) * (H * H + H)
        wt = tl.load(w + hcol[None, :] * H + hcol[:, None])  # (H, H) = W_i^T
        h = tl.maximum(_dot(h, wt, HALF, IEEE) + tl.load(w + H * H + hcol)[None, :], 0.0)
        if i < N - 1:  # the last hidden output stays in registers: only the output layer reads it
            tl.store(act_ptr + (i * B + b) * K * H + m[:, None] * H + hcol[None, :], h.to(act_t),
                     mask=live[:, None])
    out_w = row + H * D0 + H + (N - 1) * (H * H + H)
    w_out = tl.load(out_w + hcol)
    pred = tl.sum(h * w_out[None, :], axis=1) + tl.load(out_w + H)

    # The loss per point and its derivative, divided by K: the gradient of the shape's mean loss.
    y = tl.load(y_ptr + b * K + m, mask=live, other=0.0)
    if LOSS == 0:  # l1
        d = pred - y
        loss = tl.abs(d)
        dpred = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif LOSS == 1:  # clamped_l1 (torch's clamp passes the gradient on the closed interval)
        d = tl.minimum(tl.maximum(pred, -clamp), clamp) - tl.minimum(tl.maximum(y, -clamp), clamp)
        loss = tl.abs(d)
        inside = (pred >= -clamp) & (pred <= clamp)
        dpred = tl.where(inside, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)), 0.0)
    elif LOSS == 2:  # mse
        d = pred - y
        loss = d * d
        dpred = 2.0 * d
    else:  # bce on logits, inside (sdf < 0) = 1
        t = (y < 0).to(tl.float32)
        loss = tl.maximum(pred, 0.0) - pred * t + tl.log(1.0 + tl.exp(-tl.abs(pred)))
        dpred = 1.0 / (1.0 + tl.exp(-pred)) - t
    loss = tl.where(live, loss, 0.0)
    dpred = tl.where(live, dpred, 0.0) / K
    tl.store(loss_ptr + b * NB + blk, tl.sum(loss, axis=0))

    # Output layer: dW = sum_m dpred_m H_N-1,m, db = sum_m dpred_m (this block's share).
    part = last_ptr + (b * NB + blk) * (H + 1)
    tl.store(part + hcol, tl.sum(dpred[:, None] * h, axis=0))
    tl.store(part + H, tl.sum(dpred, axis=0))

    # Backward through the hidden layers: dZ_i = dH_i * [H_i > 0], dH_{i-1} = dZ_i W_i. H_i is read back from
    # the scratch this program wrote (the barrier makes the other threads' stores visible).
    tl.debug_barrier()
    dh = dpred[:, None] * w_out[None, :]
    for r in tl.static_range(N):
        i = N - 1 - r
        if i < N - 1:
            h = tl.load(act_ptr + (i * B + b) * K * H + m[:, None] * H + hcol[None, :], mask=live[:, None],
                        other=0.0)
        dz = tl.where(h > 0, dh, 0.0)
        tl.store(dz_ptr + (i * B + b) * K * H + m[:, None] * H + hcol[None, :], dz.to(act_t), mask=live[:, None])
        if i > 0:
            w = row + H * D0 + H + (i - 1) * (H * H + H)
            wi = tl.load(w + hcol[:, None] * H + hcol[None, :])  # (H, H) = W_i
            dh = _dot(dz, wi, HALF, IEEE)


@triton.jit
def _weight_grad(
    dz_ptr, in_ptr, grad_ptr,  # dZ (B, K, H), layer input (B, K, D_STRIDE), gradient rows (B, P)
    B, K, P, w_off,
    H: tl.constexpr, D_IN: tl.constexpr, D_STRIDE: tl.constexpr, BI: tl.constexpr,
    HALF: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr,
):
    """dW = dZ^T X (H, D_IN) and db = sum dZ over the K points, for columns [c0, c0 + BI) of one shape."""
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BI
    o = tl.arange(0, H)
    c = c0 + tl.arange(0, BI)
    acc = tl.zeros((H, BI), dtype=tl.float32)
    acc_b = tl.zeros((H,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kin = k < K
        dzt = tl.load(dz_ptr + b * K * H + k[None, :] * H + o[:, None], mask=kin[None, :], other=0.0)  # (H, BK)
        xin = tl.load(in_ptr + b * K * D_STRIDE + k[:, None] * D_STRIDE + c[None, :],
                      mask=kin[:, None] & (c < D_IN)[None, :], other=0.0)  # (BK, BI)
        acc += _dot(dzt, xin, HALF, IEEE)
        acc_b += tl.sum(dzt.to(tl.float32), axis=1)
    row = grad_ptr + b * P + w_off
    tl.store(row + o[:, None] * D_IN + c[None, :], acc, mask=(c < D_IN)[None, :])
    if c0 == 0:
        tl.store(row + H * D_IN + o, acc_b)


# ------------------------------------------------------------------------------------ the step


def loss_and_grad(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, spec: MLPSpec,
                  tuning: Tuning = Tuning()) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad (B, P), per-shape mean losses (B,)) of B MLP fields' rows on their points: the gradient of
    sum_b mean_k loss(f_b(x_bk), y_bk) with respect to the rows."""
    check(rows.device, "fit.kernel=triton")
    spec.validate()
    b, p = rows.shape
    if p != spec.size:
        raise ValueError(f"fused MLP kernel: rows have {p} parameters; {spec} has {spec.size}")
    if x.shape[:1] != (b,) or x.shape[2:] != (3,) or y.shape != x.shape[:2]:
        raise ValueError(f"fused MLP kernel: points {tuple(x.shape)} and targets {tuple(y.shape)} do not match "
                         f"{b} rows as (B, K, 3) and (B, K)")
    k = x.shape[1]
    h, n, d0 = spec.hidden, spec.layers, spec.d_in
    d0p = max(16, 1 << (d0 - 1).bit_length())
    rows, x, y = (t.contiguous().float() for t in (rows, x, y))
    dev = rows.device
    act_dtype = torch.bfloat16 if spec.half else torch.float32
    # IEEE: exact fp32 products (fp32 precision, and always in the interpreter); else TF32 / bf16 tensor cores
    ieee = interpreted() or (not spec.half and torch.get_float32_matmul_precision() == "highest")
    bm = tuning.block_points
    nb = math.ceil(k / bm)

    pe = torch.empty(b, k, d0p, device=dev, dtype=act_dtype)
    act = torch.empty(max(n - 1, 1), b, k, h, device=dev, dtype=act_dtype)  # H_0 .. H_{N-2}
    dz = torch.empty(n, b, k, h, device=dev, dtype=act_dtype)
    last = torch.empty(b, nb, h + 1, device=dev, dtype=torch.float32)
    losses = torch.empty(b, nb, device=dev, dtype=torch.float32)
    _forward_backward[(b, nb)](
        rows, x, y, pe, act, dz, last, losses, b, k, p, nb, float(spec.clamp),
        BANDS=max(spec.bands, 1), D0=d0, D0P=d0p, H=h, N=n, LOSS=LOSS_IDS[spec.loss], HALF=spec.half, IEEE=ieee,
        BM=bm, num_warps=tuning.warps)

    grad = torch.empty(b, p, device=dev, dtype=torch.float32)
    offset = 0
    for i in range(n):
        inputs, d_in, stride = (pe, d0, d0p) if i == 0 else (act[i - 1], h, h)
        bi = min(stride, 64)
        _weight_grad[(b, math.ceil(stride / bi))](
            dz[i], inputs, grad, b, k, p, offset, H=h, D_IN=d_in, D_STRIDE=stride, BI=bi, HALF=spec.half,
            IEEE=ieee, BK=tuning.block_k, num_warps=tuning.weight_warps)
        offset += h * d_in + h
    grad[:, offset:] = last.sum(1)
    return grad, losses.sum(1) / k
