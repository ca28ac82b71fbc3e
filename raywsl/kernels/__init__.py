"""Fused GPU kernels written in Triton: the fitting step of the MLP fields (`mlp.py`) and the
pairwise Chamfer matrix (`chamfer.py`).

They run compiled on a CUDA device. On a CPU they run only in Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is first imported): exact but slow, which is how the tests
check them against the torch implementations on a machine without a GPU. This package imports
nothing from raywsl; the kernel modules import triton, so callers import them only once `check`
says they can run.
"""

from __future__ import annotations

import importlib.util
import os

import torch

INTERPRET = "TRITON_INTERPRET"


class KernelUnavailable(RuntimeError):
    """A fused kernel was asked for where it cannot run."""


def interpreted() -> bool:
    """Triton kernels run in its interpreter (on CPU tensors) in this process."""
    return os.environ.get(INTERPRET, "0") not in ("", "0")


def check(device: torch.device | str, what: str) -> None:
    """Raise KernelUnavailable, naming `what` asked for the kernel, unless a Triton kernel can run
    on `device`: triton installed, and a CUDA device, or a CPU with the interpreter on."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        raise KernelUnavailable(f"{what}: the fused kernels need triton (it comes with CUDA builds of torch; "
                                "`pip install triton` elsewhere)")
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return
    raise KernelUnavailable(f"{what}: the fused Triton kernels run on a CUDA device, not on {device} "
                            f"(on a CPU only in Triton's interpreter, {INTERPRET}=1, for correctness checks)")
