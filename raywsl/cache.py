"""The artifact cache on disk: atomic publishing, one producer per artifact, run folders as views.

    <cache>/<stage>/<fingerprint>/          a published artifact (artifact.json inside, written last)
    <cache>/<stage>/<fingerprint>.tmp-<id>/ one being written (renamed into place when complete)
    <cache>/<stage>/<fingerprint>.work/     Ray Train's resumable run folder of a training stage
    <cache>/<stage>/<fingerprint>.lock      held by the process producing the artifact

Publishing: a folder artifact is written under a temporary name, completed (artifact.json last),
then renamed into place, so a reader sees a whole artifact or none, and a kill at any moment leaves
only a temporary folder (`raywsl gc` removes it). A row store is created the same way, then filled
shard by shard in place (its shard markers are its commits: store/rows.py).

One producer: `lock(stage, fp)` is an exclusive lock per artifact. On a local disk or a shared file
system it is an flock(2) on the .lock file (released by the kernel when the holder dies, so a kill -9
never leaves a stale lock); for a cache at a URL (s3://, ...) where no file lock can serve, a named
Ray actor hands out leases that the holder renews (a dead holder's lease expires). A second process
asking for the same artifact waits, then finds it done (or the shards it needs done) and reuses it.

Small files a run folder owns (config.yaml, stages.json, metrics.json) are written atomically too
(`write_text`): a temporary file renamed over the old one.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import fsspec

from raywsl import contract as C

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a Ray lock's lease, renewed every LEASE_S / 3 by its holder
POLL_S = 0.5


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory); a URL
    as it is."""
    return os.path.abspath(local_path(path)) if is_local(path) else path


# ------------------------------------------------------------------------------------ files

def write_bytes(path: str, data: bytes) -> None:
    """Write a file atomically: a temporary file beside it, renamed over it (one PUT remotely, which
    an object store makes visible whole or not at all)."""
    if not is_local(path):
        fs, p = fsspec.core.url_to_fs(path)
        fs.pipe_file(p, data)
        return
    path = local_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{C.TMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def npy_bytes(array) -> bytes:
    """An array in .npy format (np.save's bytes), for write_bytes."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def read_bytes(path: str) -> bytes:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.cat_file(p)


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def put_folder(local: str, url: str) -> None:
    """Copy the files of the local folder `local` into `url` (a folder, local or remote)."""
    fs, dest = fsspec.core.url_to_fs(url)
    for root, _, names in os.walk(local):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), local)
            fs.put_file(os.path.join(root, name), C.join(dest, rel.replace(os.sep, "/")))


def get_folder(url: str, local: str) -> None:
    """Copy the files under `url` (a folder, local or remote) into the local folder `local`."""
    fs, src = fsspec.core.url_to_fs(url)
    src = src.rstrip("/")
    for path in fs.find(src):
        target = os.path.join(local, *path[len(src) + 1:].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target)


@contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path to write `path` through (a log file that grows while a command runs): `path`
    itself when it is local, else a temporary file uploaded to `path` when the block ends."""
    if is_local(path):
        yield local_path(path)
        return
    local = os.path.join(tempfile.mkdtemp(prefix="raywsl-"), path.rstrip("/").rsplit("/", 1)[-1])
    try:
        yield local
    finally:
        if os.path.exists(local):
            with open(local, "rb") as f:
                write_bytes(path, f.read())


def jsonable(value: Any) -> Any:
    """json.dumps fallback for numpy values and paths."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str, obj: Any, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=jsonable))


def read_json(path: str, default: Any = None) -> Any:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return default
    return json.loads(fs.cat_file(p))


def update_json(path: str, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into the JSON object at `path` (atomically; the file need not exist)."""
    current = read_json(path, {})
    current.update(values)
    write_json(path, current)
    return current


# ------------------------------------------------------------------------------------ artifacts

def is_complete(folder: str) -> bool:
    """A published artifact: its artifact.json is there (written last, before the rename)."""
    fs, p = fsspec.core.url_to_fs(folder)
    return fs.exists(C.join(p, C.ARTIFACT_INFO))


def artifact_info(folder: str) -> dict[str, Any]:
    return read_json(C.join(folder, C.ARTIFACT_INFO), {})


@contextmanager
def publishing(artifact: C.Artifact, info: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield a temporary folder to write `artifact` into; when the block ends without an error, write
    artifact.json and rename the folder into place. On an error the temporary folder is removed."""
    fs, final = fsspec.core.url_to_fs(artifact.path)
    tmp_url = f"{artifact.path}{C.TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp = fsspec.core.url_to_fs(tmp_url)[1]
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield tmp_url
        write_json(C.join(tmp_url, C.ARTIFACT_INFO), {
            "stage": artifact.stage, "fingerprint": artifact.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})})
        if os.environ.get("RAYWSL_CRASH_PUBLISH") == artifact.stage:  # fault injection for the kill tests
            os._exit(137)
        if fs.exists(final):  # an unpublished leftover (--restart removed the old one): never ours
            fs.rm(final, recursive=True)
        if is_local(artifact.path):
            os.rename(tmp, final)  # atomic on one file system
        else:
            _move_remote(fs, tmp, final)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise


def _move_remote(fs, tmp: str, final: str) -> None:
    """Object stores have no rename: copy every object, artifact.json last (readers take its presence
    for completeness), then delete the temporary ones."""
    files = [f for f in fs.find(tmp) if f.rsplit("/", 1)[-1] != C.ARTIFACT_INFO]
    fs.copy(files, [final + f[len(tmp):] for f in files])
    fs.copy(C.join(tmp, C.ARTIFACT_INFO), C.join(final, C.ARTIFACT_INFO))
    fs.rm(tmp, recursive=True)


def remove(folder: str) -> None:
    fs, p = fsspec.core.url_to_fs(folder)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def work_dir(artifact: C.Artifact) -> str:
    """Where a training stage keeps Ray Train's resumable run folder until it publishes."""
    return artifact.path + C.WORK_SUFFIX


# ------------------------------------------------------------------------------------ locks

@contextmanager
def lock(artifact: C.Artifact, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of `artifact` for the block; waits (calling `on_wait` once) while
    another process holds it."""
    if not is_local(artifact.path):
        with _ray_lock(artifact.path, on_wait):
            yield
        return
    with file_lock(local_path(artifact.path) + C.LOCK_SUFFIX, on_wait):
        yield


@contextmanager
def file_lock(path: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive flock(2) on `path` (created if missing) for the block; released when the holder
    dies, however it dies."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_locked(folder: str) -> bool:
    """Whether some process holds the lock of the artifact at `folder` (local caches)."""
    path = local_path(folder) + C.LOCK_SUFFIX
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class LockService:
    """A named Ray actor handing out leases by name: the lock of caches no file lock can serve."""

    NAME, NAMESPACE = "raywsl-locks", "raywsl"

    def __init__(self):
        self.leases: dict[str, tuple[str, float]] = {}  # name -> (holder token, expiry)

    def acquire(self, name: str, token: str, lease_s: float) -> bool:
        holder = self.leases.get(name)
        if holder and holder[0] != token and holder[1] > time.time():
            return False
        self.leases[name] = (token, time.time() + lease_s)
        return True

    def release(self, name: str, token: str) -> None:
        if self.leases.get(name, ("",))[0] == token:
            del self.leases[name]


def lock_service():
    import ray

    return ray.remote(num_cpus=0)(LockService).options(  # DEFAULT: never inside a sweep trial's placement group
        name=LockService.NAME, namespace=LockService.NAMESPACE, lifetime="detached",
        get_if_exists=True, scheduling_strategy="DEFAULT").remote()


@contextmanager
def _ray_lock(name: str, on_wait: Callable[[], None] | None) -> Iterator[None]:
    import ray

    service, token = lock_service(), uuid.uuid4().hex
    waited = False
    while not ray.get(service.acquire.remote(name, token, LEASE_S)):
        if not waited and on_wait:
            on_wait()
        waited = True
        time.sleep(POLL_S)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 3):
            ray.get(service.acquire.remote(name, token, LEASE_S))

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        ray.get(service.release.remote(name, token))


# ------------------------------------------------------------------------------------ run folders

def link(run: C.RunLayout, stage: str, target: str) -> None:
    """Show `target` (an artifact in the cache) in the run folder under the stage's name: a relative
    symlink on a local disk, replaced atomically; remote run folders have only stages.json."""
    if not (is_local(run.root) and is_local(target)):
        return
    path = local_path(run.link(stage))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rel = os.path.relpath(os.path.abspath(local_path(target)), os.path.dirname(os.path.abspath(path)))
    if os.path.islink(path) and os.readlink(path) == rel:
        return
    if os.path.exists(path) and not os.path.islink(path):
        log.warning("%s is not a link to the cache (a run folder from an older raywsl?); left as it is", path)
        return
    tmp = f"{path}{C.TMP_MARK}{uuid.uuid4().hex[:8]}"
    os.symlink(rel, tmp)
    os.replace(tmp, path)


def referenced(run_roots: list[str]) -> set[str]:
    """Artifact folders the stages.json of these run folders point at (absolute local paths)."""
    refs = set()
    for root in run_roots:
        stages = read_json(C.join(root, C.STAGES_FILE), {})
        for entry in stages.get("stages", {}).values():
            if entry.get("artifact"):
                refs.add(os.path.abspath(local_path(entry["artifact"])))
    return refs


def run_folders(parent: str) -> list[str]:
    """The run folders directly inside `parent` (those with a stages.json)."""
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, d) for d in os.listdir(parent)
                  if os.path.exists(os.path.join(parent, d, C.STAGES_FILE)))


def garbage(cache: str, run_roots: list[str]) -> list[str]:
    """What `raywsl gc` removes from a local cache: artifacts no run folder refers to (and their lock
    files), and what interrupted producers left (temporary folders, Ray Train work folders) that no
    live process holds."""
    refs = referenced(run_roots)
    out = []
    for stage in C.STAGES:
        folder = os.path.join(cache, stage)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            leftover = C.TMP_MARK in name or name.endswith(C.WORK_SUFFIX)
            base = path.split(C.TMP_MARK)[0].removesuffix(C.WORK_SUFFIX).removesuffix(C.LOCK_SUFFIX)
            if is_locked(base) or (not leftover and os.path.abspath(base) in refs):
                continue
            out.append(path)
    return out


def collect_garbage(cache: str, run_roots: list[str], dry_run: bool = False) -> list[str]:
    paths = garbage(cache, run_roots)
    if not dry_run:
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return paths
