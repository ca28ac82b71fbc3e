"""The batched fitter: B shapes' fields trained at once on one device, with continuous batching.

    fitter = BatchedFitter(field, cfg.fit)
    for result in fitter.fit(shapes):     # shapes: an iterable of ShapeData, results as they finish
        ...

All B shapes' weights are rows of one (B, P) tensor; the field's batched forward runs every layer as
one batched matmul, and Adam runs on the whole (B, P) block with per-row step counts and learning
rates. Nothing mixes rows (the loss is a sum of per-shape means, so each row's gradient is its own
shape's), so fitting a shape in a batch gives the result of fitting it alone, and a shape that
diverges (NaN) poisons only its own row.

The gradient comes from autograd over the field's batched forward (`fit.kernel=torch`, every field
type) or from one fused Triton forward-backward (`fit.kernel=triton`, raywsl/kernels/mlp.py: mlp fields
on a GPU); the Adam update is the same torch code for both.

Every `check_every` steps the per-shape losses come to the host (the one sync) and each slot is
judged: finished (steps done, target loss reached, or plateaued), diverged (non-finite loss, non-finite
weights, or `BLOWUP` x its best loss, the initial loss included: restarted from its init at lr x
lr_backoff, up to max_restarts, then failed with the reason), or still going. A result is ok only with
finite weights (FitResult checks it again): a NaN row never reaches the store. Finished slots take
the next shape at once, so one slow shape never holds back B-1 finished ones; when the queue runs
dry the batch shrinks to the live slots.

Points per step: each shape's samples are shuffled once (seeded per shape id) and step t takes the
window [t K, (t + 1) K) of that order, wrapping around, so the stream a shape sees depends on the
shape alone, never on which other shapes share its batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from raywsl.config import FitConfig
from raywsl.kernels import check
from raywsl.models.fields import Field
from raywsl.models.losses import LOSSES
from raywsl.geometry.sampling import shape_rng

log = logging.getLogger(__name__)

BLOWUP = 1e3  # a loss this many times above the shape's best so far counts as divergence
PLATEAU_GAIN = 0.01  # a plateau: no 1 % improvement of the best loss within `patience` steps
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class ShapeData:
    """One shape to fit: its SDF samples and its initial row."""

    key: int  # the caller's handle (the row index in the store)
    shape_id: str
    points: np.ndarray  # (M, 3) float32
    sdf: np.ndarray  # (M,) float32
    init: Tensor  # (P,) float32 initial weights


@dataclass
class FitResult:
    key: int
    shape_id: str
    row: np.ndarray | None  # (P,) float32 fitted weights; None when the shape failed
    loss: float  # mean training loss over its last check interval
    steps: int  # steps of the final attempt
    reason: str = ""  # why it failed ("" when it did not)
    restarts: int = 0
    curve: list[float] = field(default_factory=list)  # loss per check interval, final attempt

    def __post_init__(self) -> None:
        # An ok result has finite weights, whoever made it: one NaN row in the store would poison the
        # standardiser and every model trained on the rows.
        if self.row is not None and not np.isfinite(self.row).all():
            self.row = None
            self.reason = self.reason or f"diverged: non-finite weights at step {self.steps}"

    @property
    def ok(self) -> bool:
        return self.row is not None


# ------------------------------------------------------------------------------------ schedules
# lr factor in [lr_end / lr, 1] as a function of progress u = step / steps in [0, 1].

def _exp(u: Tensor, end: float) -> Tensor:
    return end ** u


def _cosine(u: Tensor, end: float) -> Tensor:
    return end + (1 - end) * 0.5 * (1 + torch.cos(math.pi * u))


def _constant(u: Tensor, end: float) -> Tensor:
    return torch.ones_like(u)


SCHEDULES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "exp": _exp, "cosine": _cosine, "constant": _constant, "plateau": _constant}


# ------------------------------------------------------------------------------------ the fitter

def keep_freed_memory() -> None:
    """Stop glibc from returning the big activation buffers to the OS after every step and
    faulting them in again on the next (measured: ~1 GB of page faults per step, a third of the
    CPU time, for decoder54k at B = 16). Linux/glibc only; elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from <malloc.h>
    libc.mallopt(m_trim_threshold, 2**30)
    libc.mallopt(m_mmap_max, 0)


def shuffled(shape: ShapeData) -> tuple[np.ndarray, np.ndarray]:
    """The shape's samples in its own seeded order (by shape id): step windows cover it evenly."""
    order = shape_rng(0, shape.shape_id).permutation(len(shape.sdf))
    return (np.ascontiguousarray(shape.points[order], np.float32),
            np.ascontiguousarray(shape.sdf[order], np.float32))


@dataclass
class _Slot:
    """Host-side bookkeeping of one batch slot."""

    shape: ShapeData
    restarts: int = 0
    lr: float = 0.0  # base learning rate of the current attempt
    best: float = math.inf
    since_best: int = 0
    curve: list[float] = field(default_factory=list)


class BatchedFitter:
    """Fits shapes B at a time on one device; holds the (B, P) weights and Adam state between
    calls, so an actor keeps one fitter (and its compiled step) for its whole life."""

    def __init__(self, field: Field, cfg: FitConfig, device: str | torch.device = "auto"):
        self.field, self.cfg = field, cfg
        self.layout = field.layout
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.autocast = cfg.precision == "bf16" and self.device.type == "cuda"
        if cfg.precision != "fp32" and self.device.type != "cuda":
            log.info("fit.precision=%s needs a GPU: fitting in fp32 on %s", cfg.precision, self.device)
        if cfg.precision == "tf32" and self.device.type == "cuda":
            # fp32 storage, TF32 tensor-core matmuls. Not `matmul.fp32_precision = "tf32"` alone: after it
            # torch (2.13) raises on legacy reads (get_float32_matmul_precision, allow_tf32) that Inductor
            # and other libraries still make; this call sets the legacy and new flags consistently.
            torch.set_float32_matmul_precision("high")
        if self.device.type == "cpu":
            keep_freed_memory()
        self.loss_fn = LOSSES[cfg.loss]
        self.schedule = SCHEDULES[cfg.schedule]
        self.end = cfg.lr_end / cfg.lr if cfg.lr > 0 else 1.0
        self._loss_and_grad = self._torch_loss_and_grad if cfg.kernel == "torch" else self._fused(field)
        # One graph (gather, forward, torch.func.grad, Adam); the batch dimension turns dynamic
        # after its first change (the tail's shrinking batch), so that costs one recompile. The fused
        # kernel is its own compiled program: nothing left worth a graph.
        if cfg.compile and cfg.kernel != "torch":
            log.info("fit.compile: not applied with fit.kernel=%s (the step is the fused kernel)", cfg.kernel)
        self._step_fn = torch.compile(self._step, fullgraph=True) if cfg.compile and cfg.kernel == "torch" \
            else self._step

    # ---------------------------------------------------------------- public

    def fit(self, shapes: Iterable[ShapeData]) -> Iterator[FitResult]:
        """Fit every shape; yields each result as its shape finishes (not in input order)."""
        queue = iter(shapes)
        first = next(queue, None)
        if first is None:
            return
        self._allocate(first)
        slots: list[_Slot | None] = [self._load(0, first)]
        for b in range(1, self.cfg.batch_size):
            shape = next(queue, None)
            slots.append(self._load(b, shape) if shape is not None else None)
        slots = self._compact(slots)
        while slots:
            t0 = time.perf_counter()
            for _ in range(self.cfg.check_every):
                self._step_fn()
            # The one sync per check: interval losses, initial losses, steps and whether each row's
            # weights are all finite, in one transfer.
            dtype = self.loss_sum.dtype
            losses, start, steps, finite = torch.stack([
                self.loss_sum / self.loss_count.clamp(min=1), self.start_loss, self.t.to(dtype),
                torch.isfinite(self.rows).all(1).to(dtype)]).cpu().numpy()
            self.seconds_per_step = (time.perf_counter() - t0) / self.cfg.check_every
            self.loss_sum.zero_()
            self.loss_count.zero_()
            for b, slot in enumerate(slots):
                if slot and not slot.curve and math.isfinite(start[b]):
                    slot.best = float(start[b])  # first check of this attempt
                result = self._judge(b, slot, float(losses[b]), int(steps[b]), bool(finite[b])) if slot else None
                if result is None:
                    continue
                yield result
                shape = next(queue, None)
                slots[b] = self._load(b, shape) if shape is not None else None
                if shape is None:
                    self.active[b] = False
            slots = self._compact(slots)

    # ---------------------------------------------------------------- the training step

    def _step(self) -> None:
        k = self.cfg.points_per_step
        idx = (self.t.unsqueeze(1) * k + self.window) % self.n_samples  # (B, K): each slot's own window
        x = torch.gather(self.points, 1, idx.unsqueeze(2).expand(-1, -1, 3))
        y = torch.gather(self.sdf, 1, idx)
        grad, per_shape = self._loss_and_grad(self.rows, x, y)
        # The loss of the initial weights: the yardstick of divergence until the first check.
        self.start_loss = torch.where(self.t == 0, per_shape, self.start_loss)
        live = (self.active & (self.t < self.cfg.steps)).to(per_shape.dtype)  # stop at exactly `steps`
        self._adam(grad, live)
        self.loss_sum += per_shape * live
        self.loss_count += live

    def _torch_loss_and_grad(self, rows: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient of the rows, per-shape losses) by autograd over the field's batched forward."""
        # torch.func.grad rather than autograd.grad on a detached leaf: one graph for torch.compile.
        return torch.func.grad(self._loss, has_aux=True)(rows, x, y)

    def _fused(self, field: Field) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The same function as `_torch_loss_and_grad`, one fused Triton forward-backward (mlp fields)."""
        check(self.device, "fit.kernel=triton")
        from raywsl.kernels.mlp import MLPSpec, loss_and_grad  # imports triton: only once it can run

        if field.type_name != "mlp" or field.masks:
            raise ValueError(f"fit.kernel=triton computes mlp fields without asymmetric masks, not "
                             f"{field.type_name}{' with field.asym' * bool(field.masks)}: use fit.kernel=torch")
        c = field.config
        spec = MLPSpec(c["bands"], c["hidden"], c["layers"], self.cfg.loss, self.cfg.clamp, half=self.autocast)
        spec.validate()
        return lambda rows, x, y: loss_and_grad(rows, x, y, spec)

    def _loss(self, rows: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Sum over shapes of each shape's mean loss (so each row's gradient is its own shape's),
        and the per-shape losses."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.field.forward(self.layout.unflatten(rows), x)
        per_shape = self.loss_fn(pred.float(), y, self.cfg.clamp).mean(1)  # (B,)
        return per_shape.sum(), per_shape.detach()

    def _adam(self, grad: Tensor, live: Tensor) -> None:
        """Adam with a step count and a learning rate per row; inactive rows do not move."""
        b1, b2 = ADAM_BETAS
        self.t += live.long()
        t = self.t.to(grad.dtype).clamp(min=1)
        u = (t / self.cfg.steps).clamp(max=1)
        step_size = self.lr * self.schedule(u, self.end) * live / (1 - b1 ** t)
        self.adam_m.lerp_(grad, 1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.adam_v / (1 - b2 ** t).unsqueeze(1)).sqrt_().add_(ADAM_EPS)
        self.rows.addcdiv_(self.adam_m * step_size.unsqueeze(1), denom, value=-1.0)

    # ---------------------------------------------------------------- slots

    def _allocate(self, first: ShapeData) -> None:
        b, p = self.cfg.batch_size, self.layout.size
        self.n_samples = len(first.sdf)
        if self.n_samples < 1:
            raise ValueError(f"shape {first.shape_id}: no SDF samples")
        dev, f32 = self.device, torch.float32
        self.points = torch.zeros(b, self.n_samples, 3, device=dev, dtype=f32)
        self.sdf = torch.zeros(b, self.n_samples, device=dev, dtype=f32)
        self.rows = torch.zeros(b, p, device=dev, dtype=f32)
        self.adam_m = torch.zeros(b, p, device=dev, dtype=f32)
        self.adam_v = torch.zeros(b, p, device=dev, dtype=f32)
        self.t = torch.zeros(b, dtype=torch.long, device=dev)  # steps taken by each slot's shape
        self.lr = torch.zeros(b, device=dev, dtype=f32)
        self.active = torch.zeros(b, dtype=torch.bool, device=dev)
        self.loss_sum = torch.zeros(b, device=dev, dtype=f32)
        self.loss_count = torch.zeros(b, device=dev, dtype=f32)
        self.start_loss = torch.zeros(b, device=dev, dtype=f32)
        self.window = torch.arange(self.cfg.points_per_step, device=dev)

    def _load(self, b: int, shape: ShapeData) -> _Slot:
        if len(shape.sdf) != self.n_samples or shape.points.shape != (self.n_samples, 3):
            raise ValueError(f"shape {shape.shape_id}: {len(shape.sdf)} SDF samples with points "
                             f"{shape.points.shape}; every shape of a fit needs ({self.n_samples}, 3)")
        points, sdf = shuffled(shape)
        self.points[b] = torch.from_numpy(points)
        self.sdf[b] = torch.from_numpy(sdf)
        slot = _Slot(shape)
        self._restart(b, slot, self.cfg.lr)
        return slot

    def _restart(self, b: int, slot: _Slot, lr: float) -> None:
        """(Re)start slot b's shape from its initial weights at learning rate `lr`."""
        self.rows[b] = slot.shape.init.to(self.device, torch.float32)
        self.adam_m[b] = 0
        self.adam_v[b] = 0
        self.t[b] = 0
        self.lr[b] = lr
        self.active[b] = True
        slot.lr, slot.best, slot.since_best, slot.curve = lr, math.inf, 0, []

    def _compact(self, slots: list[_Slot | None]) -> list[_Slot | None]:
        """Drop idle slots (the queue is dry): a finished shape costs no more compute."""
        keep = [b for b, s in enumerate(slots) if s is not None]
        if not keep:
            return []
        if len(keep) == len(slots):
            return slots
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for name in ("points", "sdf", "rows", "adam_m", "adam_v", "t", "lr", "active", "loss_sum", "loss_count",
                     "start_loss"):
            setattr(self, name, getattr(self, name).index_select(0, index).contiguous())
        return [slots[b] for b in keep]

    # ---------------------------------------------------------------- judging a slot

    def _judge(self, b: int, slot: _Slot, loss: float, steps: int, finite_row: bool) -> FitResult | None:
        """A FitResult when slot b's shape is finished (done or failed), else None. `finite_row`: every
        weight of its row is finite."""
        cfg = self.cfg
        shape = slot.shape
        what = ("non-finite loss" if not math.isfinite(loss) else "non-finite weights" if not finite_row
                else f"loss {loss:.3g} ({BLOWUP:g}x its best {slot.best:.3g})" if loss > BLOWUP * slot.best else "")
        if what:
            if slot.restarts < cfg.max_restarts:
                slot.restarts += 1
                log.info("shape %s diverged (%s at step %d, lr %.3g): restart %d at lr %.3g",
                         shape.shape_id, what, steps, slot.lr, slot.restarts, slot.lr * cfg.lr_backoff)
                self._restart(b, slot, slot.lr * cfg.lr_backoff)
                return None
            reason = (f"diverged: {what} at step {steps} with lr {slot.lr:.3g}, after "
                      f"{slot.restarts} restart(s) (lr x{cfg.lr_backoff:g} each)")
            return FitResult(shape.key, shape.shape_id, None, loss, steps, reason, slot.restarts, slot.curve)
        slot.curve.append(loss)
        if loss < slot.best * (1 - PLATEAU_GAIN):
            slot.best, slot.since_best = loss, 0
        else:
            slot.best = min(slot.best, loss)
            slot.since_best += cfg.check_every
        finished = steps >= cfg.steps or (cfg.target_loss > 0 and loss <= cfg.target_loss)
        if cfg.patience and slot.since_best >= cfg.patience:
            if cfg.schedule == "plateau" and slot.lr * 0.1 >= cfg.lr_end:
                slot.lr *= 0.1
                self.lr[b] = slot.lr
                slot.since_best = 0
            else:
                finished = True
        if not finished:
            return None
        row = self.rows[b].detach().cpu().numpy().copy()
        return FitResult(shape.key, shape.shape_id, row, loss, steps, "", slot.restarts, slot.curve)
