"""The dependency ranges of pyproject.toml and the library APIs they rest on: the installed Ray and
torch satisfy the ranges, our Ray Data calls use only current parameters (no deprecation but the one
known and silenced), and the TF32 setting is harmless on a CPU."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The remote args our map_batches calls pass knowingly: Ray has no named parameter for these (up to
# 2.63), deprecates **ray_remote_args (and ray_remote_args_fn) as a whole, and runtime.ray_remote_args
# silences exactly those two warnings around the calls that need them.
REMOTE_ARGS = {"max_retries", "max_restarts", "max_task_retries"}


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


@pytest.mark.parametrize("extra", [None, "dev", "s3"])
def test_installed_versions_satisfy_the_ranges(extra):
    """Every dependency (and the dev / s3 extras) is installed at a version its range admits:
    ray and torch above all, whose ranges are the ones cluster images test."""
    wrong = {}
    for req in _requirements(extra):
        installed = Version(importlib.metadata.version(req.name))
        if not req.specifier.contains(installed, prereleases=True):
            wrong[req.name] = f"{installed} not in {req.specifier}"
    assert not wrong, wrong


def test_ray_and_torch_have_floors_and_ray_a_ceiling():
    """ray and torch are the two that cluster images ship: each has a floor (pyproject says which
    versions were tested), and ray's ceiling is the release that drops **ray_remote_args."""
    reqs = {r.name: r for r in _requirements()}
    assert reqs["ray"].extras == {"default", "data", "train", "tune"}
    assert {s.operator for s in reqs["ray"].specifier} == {">=", "<"}
    assert {s.operator for s in reqs["torch"].specifier} == {">="}
    # What the torch floor rests on is there (the local build tag, e.g. +cpu, aside).
    assert torch.nn.utils.get_total_norm and torch.nn.utils.clip_grads_with_norm_ and torch.func.grad


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(tree: ast.AST, attr: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr]


def _map_batches_calls() -> list[tuple[str, ast.Call]]:
    """Every `.map_batches(...)` call in the package's source, with where it is."""
    out = []
    for path in sorted((ROOT / "raywsl").rglob("*.py")):
        for call in _calls(ast.parse(path.read_text()), "map_batches"):
            out.append((f"{path.relative_to(ROOT)}:{call.lineno}", call))
    return out


def test_map_batches_calls_use_current_parameters():
    """Read each map_batches call of ours: every keyword is a named parameter of the installed Ray's
    map_batches, but `concurrency` (deprecated since Ray 2.51 with a log line, not a Python warning,
    so no warning filter catches it), or one of the known remote args, which this Ray must still take
    through **ray_remote_args."""
    import ray.data

    params = inspect.signature(ray.data.Dataset.map_batches).parameters
    takes_remote_args = any(p.kind is p.VAR_KEYWORD for p in params.values())
    calls = _map_batches_calls()
    assert len(calls) >= 3  # ingest and fit shard passes, fit stream sampling (and the readers)
    for where, call in calls:
        keywords = {k.arg for k in call.keywords}
        assert "concurrency" not in keywords, f"{where}: use compute=TaskPoolStrategy / ActorPoolStrategy(size=...)"
        remote = keywords - set(params)
        assert remote <= REMOTE_ARGS, f"{where}: unknown map_batches arguments {remote - REMOTE_ARGS}"
        assert takes_remote_args or not remote, (
            f"{where}: this Ray's map_batches takes no remote args: {sorted(remote)} are lost (pyproject: ray<2.64)")


def _inside_ray_remote_args(tree: ast.AST) -> set[int]:
    """Line numbers of the map_batches calls written inside `with ray_remote_args():` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and
                                              getattr(i.context_expr.func, "id", "") == "ray_remote_args"
                                              for i in node.items):
            lines |= {c.lineno for c in _calls(node, "map_batches")}
    return lines


def test_deprecations_are_silenced_one_by_one_and_only_where_needed():
    """Every map_batches call that passes remote args (or ray_remote_args_fn) does it inside
    runtime.ray_remote_args, and no module of ours filters warnings otherwise: a blanket filter would
    hide every other deprecation (pytest turns ours into errors)."""
    for path in sorted((ROOT / "raywsl").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = _inside_ray_remote_args(tree)
        for call in _calls(tree, "map_batches"):
            keywords = {k.arg for k in call.keywords}
            if keywords & (REMOTE_ARGS | {"ray_remote_args_fn"}):
                assert call.lineno in guarded, f"{path.name}:{call.lineno}: wrap it in runtime.ray_remote_args()"
        if path.name != "runtime.py":
            ignoring = [c.lineno for c in _calls(tree, "simplefilter") + _calls(tree, "filterwarnings")
                        if c.args and getattr(c.args[0], "value", None) == "ignore"]
            assert not ignoring, f"{path.name}:{ignoring}: a warning filter that hides warnings"


@pytest.mark.ray
def test_our_map_batches_forms_raise_only_the_silenced_deprecations(ray_local):
    """Build (not execute) the task and actor map_batches forms of ingest and fit with this Ray: the
    only DeprecationWarnings are the remote-args ones, and inside runtime.ray_remote_args none is left."""
    import ray.data

    from raywsl.runtime import ray_remote_args

    class Echo:
        def __call__(self, batch):
            return batch

    ds = ray.data.range(4, override_num_blocks=1)
    forms = [
        lambda: ds.map_batches(lambda b: b, batch_size=1, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=2),
                               memory=2**30, max_retries=2, fn_kwargs={}),
        lambda: ds.map_batches(Echo, batch_size=None, num_cpus=1, ray_remote_args_fn=lambda: {"num_gpus": 0.5},
                               compute=ray.data.ActorPoolStrategy(size=1), max_restarts=2, max_task_retries=2,
                               fn_constructor_kwargs={}),
    ]
    for build in forms:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            build()
        deprecations = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
        assert deprecations and all(re.match(r"`ray_remote_args(_fn)?` is deprecated", m) for m in deprecations)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            with ray_remote_args():
                build()


def test_tf32_setting_is_coherent_and_cpu_fits_ignore_it():
    """The engine's TF32 switch (set_float32_matmul_precision("high")) runs on a CPU-only torch and
    leaves the legacy and the new flags agreeing (torch 2.13 raises on a legacy read, as Inductor's
    autotuning makes, after setting only `matmul.fp32_precision`); and precision=tf32 on a CPU fits
    exactly as fp32 does."""
    from raywsl.config import FitConfig
    from raywsl.fit.engine import BatchedFitter, ShapeData
    from raywsl.models.fields import make_field

    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9
    try:
        torch.set_float32_matmul_precision("high")
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert not new_api or torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cuda.matmul.allow_tf32 is False

    field = make_field("mlp", "tiny")
    init = field.init_rows(1, torch.Generator().manual_seed(0))[0]
    points = np.random.default_rng(0).uniform(-1, 1, (2048, 3)).astype(np.float32)
    sdf = (np.linalg.norm(points, axis=1) - 0.5).astype(np.float32)
    rows = {}
    for precision in ("fp32", "tf32"):
        cfg = FitConfig(steps=20, batch_size=1, points_per_step=256, check_every=10, precision=precision)
        (result,) = BatchedFitter(field, cfg, "cpu").fit([ShapeData(0, "sphere", points, sdf, init)])
        rows[precision] = result.row
        assert torch.get_float32_matmul_precision() == "highest"  # a CPU fitter touches no global flag
    np.testing.assert_array_equal(rows["tf32"], rows["fp32"])
