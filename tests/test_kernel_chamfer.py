"""The fused Chamfer kernel (raywsl.kernels.chamfer) against the exact k-d trees and the torch paths of
raywsl.geometry.distances, and through the generation metrics.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py turns it on), whose products
are exact float32: there the tensor-core mode truncates its operands to TF32 first, as a tensor core
reads them, so the tolerances below hold for the compiled kernel too. With a GPU the same tests run
compiled. Sizes are tiny and blocks small (the interpreter takes milliseconds per step), with point
counts that are not multiples of the blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from raywsl.eval import generation as gen  # noqa: E402
from raywsl.geometry.distances import (chamfer_batch, chamfer_matrix, chamfer_matrix_fused,  # noqa: E402
                                       chamfer_matrix_kdtree, resolve_device)
from raywsl.kernels import KernelUnavailable  # noqa: E402
from raywsl.kernels import chamfer as kc  # noqa: E402

DEVICE = resolve_device("auto")
# Float32-level agreement with the float64 k-d trees (the torch paths are checked to rtol 1e-5 too).
TIGHT = dict(rtol=1e-5, atol=1e-7)
BLOCKS = dict(block_m=16, block_n=32)  # 2-3 blocks of rows, one or two of columns, all padded


def tuning(mode: str) -> kc.Tuning:
    return kc.Tuning(mode=mode, **BLOCKS)


def clouds(k: int, n: int, seed: int, shift=0.0) -> np.ndarray:
    """k clouds of n points on random ellipsoid surfaces in the unit sphere (evaluation-like)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((k, n, 3))
    u *= rng.uniform(0.3, 1.0, (k, 1, 3)) / np.linalg.norm(u, axis=2, keepdims=True)
    return (u + shift).astype(np.float32)


def dev(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, device=DEVICE)


def directed(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """mean_x min_y |x - y|^2 for every pair, brute force in float64."""
    a, b = A.astype(np.float64), B.astype(np.float64)
    sq = ((a[:, None, :, None, :] - b[None, :, None, :, :]) ** 2).sum(-1)  # (na, nb, n, m)
    return sq.min(3).mean(2)


@pytest.mark.parametrize("mode", sorted(kc.MODES))
def test_two_sets_match_the_kdtree_matrix_and_the_directed_definition(mode):
    A, B = clouds(3, 37, 0), clouds(4, 21, 1)  # unequal point counts
    want = chamfer_matrix_kdtree(A, B)
    got = kc.chamfer_matrix(dev(A), dev(B), tuning(mode))
    assert got.dtype == torch.float64 and got.shape == (3, 4)
    assert np.allclose(got.cpu().numpy(), want, **TIGHT)
    one_way = kc.directed_chamfer_matrix(dev(B), dev(A), tuning(mode)).cpu().numpy()
    assert np.allclose(one_way, directed(B, A), **TIGHT)


def test_plain_tf32_products_would_miss_the_tolerance():
    """What the split operands buy: the expanded form with TF32-truncated inputs (a plain tf32
    tl.dot) errs far beyond TIGHT on the same clouds; the tensor mode passes it (test above)."""
    A, B = clouds(3, 37, 0).astype(np.float64), clouds(4, 21, 1).astype(np.float64)

    def tf32(v):
        return (v.astype(np.float32).view(np.int32) & -8192).view(np.float32).astype(np.float64)

    ca = A[:, None] - B.mean(1)[None, :, None]  # centred as the kernel does: (na, nb, n, 3)
    cb = B - B.mean(1)[:, None]
    sq = ((ca ** 2).sum(-1)[..., None] + (cb ** 2).sum(-1)[None, :, None, :]
          - 2 * np.einsum("ijnc,jmc->ijnm", tf32(ca), tf32(cb)))
    plain = np.maximum(sq.min(3), 0).mean(2)
    assert not np.allclose(plain, directed(A, B), **TIGHT)
    assert np.abs(plain / directed(A, B) - 1).max() > 1e-3


@pytest.mark.parametrize("mode", sorted(kc.MODES))
def test_a_set_against_itself_is_symmetric_with_zero_diagonal(mode):
    A = clouds(4, 29, 2)
    got = kc.chamfer_matrix(dev(A), tuning=tuning(mode)).cpu().numpy()
    assert np.array_equal(got, got.T) and np.all(np.diag(got) == 0)
    assert np.allclose(got, chamfer_matrix_kdtree(A), **TIGHT)
    i, j = np.triu_indices(4, 1)
    batch = chamfer_batch(torch.as_tensor(A[i]), torch.as_tensor(A[j])).numpy()  # float32 torch, CPU
    assert np.allclose(got[i, j], batch, rtol=1e-5, atol=1e-7)


def test_clouds_far_from_the_origin_keep_float32_accuracy():
    """Each pair is centred before the expanded form: at |x| ~ 100 an uncentred float32 form would
    err by ~1e-3 on squared distances. The k-d trees see the same float32 inputs, exactly."""
    far = clouds(3, 24, 3, shift=np.array([100.0, -60.0, 30.0]))
    got = kc.chamfer_matrix(dev(far), tuning=tuning("tensor")).cpu().numpy()
    assert np.allclose(got, chamfer_matrix_kdtree(far), **TIGHT)


def test_chunked_launches_give_the_same_matrix_and_report_progress():
    A, B = clouds(2, 20, 4), clouds(3, 18, 5)
    whole = kc.chamfer_matrix(dev(A), dev(B), tuning("tensor"))
    seen = []
    # The clouds minimised over in chunks of 2 (2 x 8 operand rows x 32 padded points), launches of <= 2
    # pairs: 3 launches each way.
    parts = kc.chamfer_matrix(dev(A), dev(B), tuning("tensor"), progress=lambda done, total: seen.append((done, total)),
                              launch_pairs=2, operand_elements=2 * kc.OP_ROWS * 32)
    assert torch.equal(whole, parts)  # no atomics: bit for bit
    assert seen == [(2, 12), (4, 12), (6, 12), (8, 12), (10, 12), (12, 12)]  # 2 x 3 pairs, both ways


def test_geometry_entry_point_matches_the_torch_path():
    A, B = clouds(3, 25, 6), clouds(2, 19, 7)
    got = chamfer_matrix_fused(A, B, device=DEVICE, tuning=tuning("tensor"))
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert np.allclose(got, chamfer_matrix(A, B, device="cpu"), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="NaN"):
        chamfer_matrix_fused(np.full((2, 5, 3), np.nan, np.float32), device=DEVICE)


def test_bad_inputs_and_tunings_are_refused():
    A = dev(clouds(2, 5, 8))
    with pytest.raises(ValueError, match=r"A must be a tensor of point clouds \(count, points, 3\), got \(2, 5\)"):
        kc.chamfer_matrix(A[..., 0])
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        kc.chamfer_matrix(A, tuning=kc.Tuning(block_m=24))
    with pytest.raises(ValueError, match="mode 'fp16' is not one of"):
        kc.chamfer_matrix(A, tuning=kc.Tuning(mode="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU without the interpreter")
def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    A = clouds(2, 5, 9)
    with pytest.raises(KernelUnavailable, match=r"chamfer_matrix_fused: .* not on cpu .*TRITON_INTERPRET=1"):
        chamfer_matrix_fused(A, device="cpu")
    with pytest.raises(KernelUnavailable, match="fused Chamfer matrix"):
        kc.chamfer_matrix(torch.as_tensor(A))


def test_generation_metrics_and_nearest_training_shapes_from_the_fused_matrices():
    """The evaluation's matrices (`fastest_chamfer_matrix`: k-d trees on a CPU, this kernel on CUDA) and
    what they give, against the fused kernel's and the k-d trees': D_gr, D_gg, D_rr, MMD / COV / 1-NNA,
    nearest training shapes."""
    G, R = clouds(3, 22, 10), clouds(4, 22, 11)
    G[1] = R[2] + 0.01  # a near copy: its nearest training shape is R[2]
    matrices = {}
    metrics = gen.generation_metrics(G, R, distances=("cd",), device=DEVICE, matrices=matrices)
    fused = [chamfer_matrix_fused(G, R, device=DEVICE), chamfer_matrix_fused(G, device=DEVICE),
             chamfer_matrix_fused(R, device=DEVICE)]
    exact = [chamfer_matrix_kdtree(G, R), chamfer_matrix_kdtree(G), chamfer_matrix_kdtree(R)]
    for got, used, want in zip(fused, matrices["cd"], exact):
        assert np.allclose(got, want, **TIGHT) and np.allclose(used, want, **TIGHT)
    again = gen.set_metrics(*fused)
    assert again["cov"] == metrics["cov_cd"] and again["1nna"] == metrics["1nna_cd"]
    assert again["mmd"] == pytest.approx(metrics["mmd_cd"], rel=1e-5)
    novelty = gen.novelty(G, R, device=DEVICE)
    distance, index = gen.nearest(fused[0])
    assert np.array_equal(index, novelty.nearest_index) and index[1] == 2
    assert np.allclose(distance, novelty.nearest_cd, **TIGHT)
