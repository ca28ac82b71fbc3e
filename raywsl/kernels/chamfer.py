"""The pairwise Chamfer matrix of two sets of point clouds, fused in Triton: distances, minima and means
computed on chip, no pair's distance matrix ever written to memory.

    D = chamfer_matrix(A, B)        # A (na, n, 3), B (nb, m, 3) float32 on a CUDA device -> (na, nb) float64
    D = chamfer_matrix(A)           # A against itself: symmetric, zero diagonal

Convention (raywsl.geometry.distances): squared Euclidean distances, the sum of both directions,
CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |x - y|^2. `directed_chamfer_matrix(A, B)[i, j]` is
the first term for X = A[i], Y = B[j]; the matrix is that plus the transpose of the directed matrix
the other way (for A against itself: the same directed matrix, so one pass).

The kernel, `_directed`: one program per pair (i, j). It takes the points of A[i] BM at a time (the
rows, held on chip with their running minimum) and streams B[j] past them BN points at a time:
squared distances in the expanded form |x|^2 + |y|^2 - 2 x.y, min-reduced elementwise into a (BM, BN)
running minimum (no cross-thread reduction inside the loop), then reduced over the row once per
block, clamped at 0 (the expanded form can go slightly negative), summed in float64 and divided by n.
Programs are ordered so that consecutive ones share B[j], which stays in cache while A streams past.
No atomics: each pair's sum runs over fixed blocks in a fixed order (deterministic).

B is prepared once per call in torch (`_prepare`): each cloud centred on its own centroid and written
as 8 rows per point, [-2 y_hi (3), -2 y_lo (3), |y|^2_hi, |y|^2_lo], padded to a multiple of BN with
points at infinite norm (they never win a minimum, with no mask in the loop). The kernel centres the
points of A[i] on the same (float32) centroid of B[j], so each pair is computed near the origin, as
`distances._centred` does (it uses the first cloud's centroid; either keeps the expanded form's
cancellation error at float32 level, ~1e-7 on squared distances in the unit sphere).

Two ways to compute the products (`Tuning.mode`):

- "tensor" (default): one `tl.dot` per step on the tensor cores, K = 16: x and y are each split into
  a TF32 part (the top 11 significant bits, rounded) and the float32 remainder, and the dot carries
  x_hi.y_hi + x_hi.y_lo + x_lo.y_hi + x_lo.y_lo plus the two parts of |y|^2 against a column of ones:
  float32-level accuracy out of TF32 multipliers, whatever torch's TF32 flags say (a plain TF32 dot
  rounds coordinates to 11 bits: errors ~1e-4 on squared distances in the unit sphere, a tenth of a
  nearest-neighbour squared distance at 2,048 points). |x|^2 is added after the minimum. In the
  interpreter, which multiplies in exact float32, the operands are truncated to TF32 first
  (`EMULATE`, the worse of what a tensor core may do), so the tests check the accuracy the tensor
  cores give.
- "fma": the same expanded form on the CUDA cores, three fused multiply-adds and a min per distance.

Accuracy, measured in the interpreter on corpus shapes at 2,048 points against the float64 k-d
trees: max relative error 2e-7 (tensor, operands truncated to TF32) and 5e-7 (fma), where the tiled
torch path in float32 gives 6e-8; all far below the sampling noise of the metrics.

Both modes compile for sm_90a (checked without a GPU: `triton.compile` for a GPUTarget, then ptxas);
their speed is not measured yet. By peak rates an H100 needs a few seconds for the 1.8e13 distances
of a 2,048 x 2,048 matrix of 2,048-point clouds: the tensor mode is bound by the float32 min per
distance on the CUDA cores (the dot takes a similar time on the tensor cores, overlapped across the
two programs per SM), the fma mode by its three multiply-adds and the min.

What to tune on a GPU (benchmarks/gpu/bench_chamfer.py sweeps it; `DEFAULTS` are unmeasured): the
mode, BM and BN (the running minimum holds BM * BN float32 across the program's threads: 128 x 64
with 4 warps is 64 registers per thread, plus as many for the dot's result), warps and pipeline
stages. Ideas if it falls short: load the 8 operand rows once per step instead of the 14 rows the
dot tile repeats (half the cache traffic), and two dots in flight per step (the tensor mode waits
for each dot before its minimum).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from raywsl.kernels import check, interpreted

OP_ROWS = 8  # rows of the prepared operand per point of B: -2 y_hi (3), -2 y_lo (3), |y|^2 hi, lo
MODES = {"tensor": True, "fma": False}
# Directed pairs per kernel launch: a progress callback sees one step per launch (under a second on
# an H100 by estimate).
LAUNCH_PAIRS = 1 << 19
# Float32 elements of B's prepared operand held at once (1 GiB): B is taken in chunks of clouds above it.
OPERAND_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class Tuning:
    """How the kernel is launched (per device; measured with benchmarks/gpu/bench_chamfer.py)."""

    mode: str = "tensor"  # "tensor": split-TF32 tl.dot on the tensor cores; "fma": float32 CUDA cores
    block_m: int = 128  # BM: points of the x cloud per block, each with its running minimum on chip
    block_n: int = 64  # BN: points of the y cloud per step
    warps: int = 4
    stages: int = 3  # software pipelining of the y tiles' loads

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fused Chamfer kernel: mode {self.mode!r} is not one of {list(MODES)}")
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"fused Chamfer kernel: {name}={size} must be a power of two >= 16 (tl.dot tiles)")


# The defaults per mode, not yet measured on a GPU: the largest blocks that compile for sm_90 without
# register spills (ptxas: 214 registers per thread for tensor 128 x 64 / 4 warps, 228 for fma 64 x 64 /
# 4 warps, whose blocked layout gives each thread a column of BM / 2 rows and their x coordinates).
DEFAULTS = {"tensor": Tuning(), "fma": Tuning(mode="fma", block_m=64, block_n=64, warps=4, stages=2)}


# ------------------------------------------------------------------------------------ kernel


@triton.jit
def _tf32(v, TRUNCATE: tl.constexpr):
    """v (float32) with its last 13 mantissa bits cleared, to the TF32 grid: rounded to nearest
    (ties away from zero), or truncated as a tensor core may read a float32 operand."""
    bits = v.to(tl.int32, bitcast=True)
    if not TRUNCATE:
        bits = bits + 4096
    return (bits & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _directed(
    x_ptr,  # (rows, n, 3) float32: the clouds whose points are averaged over (A)
    op_ptr, cen_ptr,  # (cols, OP_ROWS, m_pad), (cols, 3) float32: the prepared clouds minimised over (B)
    out_ptr,  # (rows, cols) float64 view: mean over x of min over y of |x - y|^2
    rows, n, m_pad, out_stride,
    TENSOR: tl.constexpr, EMULATE: tl.constexpr, OPR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid % rows  # consecutive programs share the y cloud: its operand stays in cache
    j = pid // rows
    xs = x_ptr + i.to(tl.int64) * n * 3
    ys = op_ptr + j.to(tl.int64) * OPR * m_pad
    cols = tl.arange(0, BN)
    # Tensor mode: column k of the (BM, 16) x operand holds x_hi (k < 6), x_lo (6 <= k < 12), 1
    # (k = 12, 13) or 0; row k of the (16, BN) y tile is operand row src[k]: -2 y_hi, -2 y_lo, -2 y_hi,
    # -2 y_lo, |y|^2 hi, |y|^2 lo, 0, 0. Their dot is -2 x.y + |y|^2 with every hi/lo cross term.
    k = tl.arange(0, 16)
    coord = k % 3
    cen = tl.load(cen_ptr + j * 3 + coord)
    src = tl.where(k < 12, k % 6, k - 6)
    total = tl.zeros((1,), dtype=tl.float64)
    for s in range(0, n, BM):
        r = s + tl.arange(0, BM)
        valid = r < n
        best = tl.full((BM, BN), float("inf"), tl.float32)
        if TENSOR:
            xc = tl.load(xs + r[:, None] * 3 + coord[None, :], mask=valid[:, None], other=0.0) - cen[None, :]
            nx = tl.sum(tl.where((k < 3)[None, :], xc * xc, 0.0), axis=1)
            hi = _tf32(xc, False)
            xo = tl.where((k < 6)[None, :], hi, xc - hi)
            xo = tl.where((k < 12)[None, :], xo, tl.where((k < 14)[None, :], 1.0, 0.0))
            if EMULATE:
                xo = _tf32(xo, True)
            for t in range(0, m_pad, BN):
                yo = tl.load(ys + src[:, None] * m_pad + (t + cols)[None, :], mask=(k < 14)[:, None], other=0.0)
                if EMULATE:
                    yo = _tf32(yo, True)
                best = tl.minimum(best, tl.dot(xo, yo, input_precision="tf32"))
        else:
            x0 = tl.load(xs + r * 3, mask=valid, other=0.0) - tl.load(cen_ptr + j * 3)
            x1 = tl.load(xs + r * 3 + 1, mask=valid, other=0.0) - tl.load(cen_ptr + j * 3 + 1)
            x2 = tl.load(xs + r * 3 + 2, mask=valid, other=0.0) - tl.load(cen_ptr + j * 3 + 2)
            nx = x0 * x0 + x1 * x1 + x2 * x2
            for t in range(0, m_pad, BN):
                y = ys + t + cols
                y0 = tl.load(y) + tl.load(y + 3 * m_pad)  # -2 y = -2 y_hi + -2 y_lo, exactly
                y1 = tl.load(y + m_pad) + tl.load(y + 4 * m_pad)
                y2 = tl.load(y + 2 * m_pad) + tl.load(y + 5 * m_pad)
                ny = tl.load(y + 6 * m_pad) + tl.load(y + 7 * m_pad)
                d = ny[None, :] + x0[:, None] * y0[None, :] + x1[:, None] * y1[None, :] + x2[:, None] * y2[None, :]
                best = tl.minimum(best, d)
        near = tl.maximum(tl.min(best, axis=1) + nx, 0.0)
        total += tl.sum(tl.where(valid, near, 0.0), axis=0).to(tl.float64)
    tl.store(out_ptr + i.to(tl.int64) * out_stride + j + tl.arange(0, 1), total / n)


# ------------------------------------------------------------------------------------ wrappers


def _round_tf32(v: torch.Tensor) -> torch.Tensor:
    """float32 rounded to the TF32 grid (top 11 significant bits), as `_tf32(v, False)` in the kernel."""
    return ((v.view(torch.int32) + 4096) & -8192).view(torch.float32)


def _prepare(clouds: torch.Tensor, m_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The y operand of `_directed` for clouds (k, m, 3): (k, OP_ROWS, m_pad) and the centroids (k, 3)."""
    k, m, _ = clouds.shape
    cen = clouds.double().mean(1).float()
    y = clouds - cen[:, None]  # float32, the same subtraction the kernel does for x
    hi = _round_tf32(y)
    norm = y.double().square().sum(2)
    norm_hi = _round_tf32(norm.float())
    op = clouds.new_zeros(k, OP_ROWS, m_pad)
    op[:, 0:3, :m] = -2 * hi.transpose(1, 2)
    op[:, 3:6, :m] = -2 * (y - hi).transpose(1, 2)  # y - hi is exact in float32
    op[:, 6, :m] = norm_hi
    op[:, 6, m:] = math.inf  # padding: never the nearest point
    op[:, 7, :m] = (norm - norm_hi.double()).float()
    return op, cen.contiguous()


def _clouds(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[2] != 3 or 0 in t.shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fused Chamfer kernel: {name} must be a tensor of point clouds (count, points, 3), "
                         f"got {shape}")
    return t.to(torch.float32).contiguous()


def _directed_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, tuning: Tuning,
                   step: Callable[[int], None], launch_pairs: int, operand_elements: int) -> None:
    """out[i, j] = mean over x in x[i] of min over y in y[j] of |x - y|^2, launch by launch."""
    na, n, _ = x.shape
    nb, m, _ = y.shape
    bm, bn = tuning.block_m, tuning.block_n
    m_pad = math.ceil(m / bn) * bn
    cols_per = max(1, operand_elements // (OP_ROWS * m_pad))
    for c0 in range(0, nb, cols_per):
        c1 = min(nb, c0 + cols_per)
        op, cen = _prepare(y[c0:c1], m_pad)
        rows_per = max(1, launch_pairs // (c1 - c0))
        for r0 in range(0, na, rows_per):
            r1 = min(na, r0 + rows_per)
            _directed[((r1 - r0) * (c1 - c0),)](
                x[r0:r1], op, cen, out[r0:r1, c0:c1], r1 - r0, n, m_pad, out.stride(0),
                TENSOR=MODES[tuning.mode], EMULATE=interpreted() and MODES[tuning.mode], OPR=OP_ROWS, BM=bm, BN=bn,
                num_warps=tuning.warps, num_stages=tuning.stages)
            step((r1 - r0) * (c1 - c0))


def directed_chamfer_matrix(A: torch.Tensor, B: torch.Tensor, tuning: Tuning = Tuning(),
                            launch_pairs: int = LAUNCH_PAIRS,
                            operand_elements: int = OPERAND_ELEMENTS) -> torch.Tensor:
    """D[i, j] = mean over x in A[i] of min over y in B[j] of |x - y|^2: A (na, n, 3), B (nb, m, 3)
    float32 tensors on one device (CUDA, or CPU in the interpreter) -> (na, nb) float64 there."""
    return _matrices(A, B, tuning, None, launch_pairs, operand_elements, directed=True)


def chamfer_matrix(A: torch.Tensor, B: torch.Tensor | None = None, tuning: Tuning = Tuning(),
                   progress: Callable[[int, int], None] | None = None, launch_pairs: int = LAUNCH_PAIRS,
                   operand_elements: int = OPERAND_ELEMENTS) -> torch.Tensor:
    """CD between every cloud of A (na, n, 3) and every cloud of B (nb, m, 3): (na, nb) float64 on
    their device. B None: A against itself, exactly symmetric with a zero diagonal (one directed pass).

    `progress(done, total)`, if given, is called after each launch with the directed pairs done
    so far and in all (it waits for the device at each launch; `launch_pairs` sets their size).
    `operand_elements` bounds the prepared copy of the clouds minimised over (chunks of B)."""
    return _matrices(A, B, tuning, progress, launch_pairs, operand_elements, directed=False)


def _matrices(A, B, tuning, progress, launch_pairs, operand_elements, directed: bool) -> torch.Tensor:
    tuning.validate()
    a = _clouds(A, "A")
    b = a if B is None else _clouds(B, "B")
    if a.device != b.device:
        raise ValueError(f"fused Chamfer kernel: A is on {a.device}, B on {b.device}")
    check(a.device, "the fused Chamfer matrix")
    if launch_pairs < 1 or operand_elements < 1:
        raise ValueError(f"fused Chamfer kernel: launch_pairs ({launch_pairs}) and operand_elements "
                         f"({operand_elements}) must be >= 1")
    passes = [(a, b)] if directed or B is None else [(a, b), (b, a)]
    total, done = sum(len(x) * len(y) for x, y in passes), 0

    def step(pairs: int) -> None:
        nonlocal done
        done += pairs
        if progress is not None:
            if a.device.type == "cuda":
                torch.cuda.synchronize(a.device)
            progress(done, total)

    with torch.cuda.device(a.device) if a.device.type == "cuda" else nullcontext():
        out = [torch.empty(len(x), len(y), dtype=torch.float64, device=a.device) for x, y in passes]
        for d, (x, y) in zip(out, passes):
            _directed_into(d, x, y, tuning, step, launch_pairs, operand_elements)
    if directed:
        return out[0]
    if B is None:
        d = out[0] + out[0].T  # exactly symmetric (float addition commutes)
        return d.fill_diagonal_(0.0)
    return out[0] + out[1].T

