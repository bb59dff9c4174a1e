"""File helpers of the log store: atomic JSON records, zarr arrays, shard locks, versions.

Every write here is one atomic single-key write (a temp file renamed into place, a zarr chunk,
an exclusive create), or a directory renamed into place once complete: the commit protocol of
``writer.py`` is built from these steps only, so that it maps onto an object store's atomic
PUT / conditional PUT (see ``docs/format.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from typing import Any

import numpy as np
import tensorstore as ts

from jaxinf._src.store_format import COMMIT_FILE, WRITER_ID, LogFormatError

LOCK_FILE = "lock.json"
COMMIT_LOCK_FILE = "commit.lock"  # log level: held only while one shard's commit record advances


class LogLockedError(RuntimeError):
    """Another live writer holds the shard (same ``writer_id``); the message names the owner."""


# ----------------------------------------------------------------------------- JSON records


def _write_temp_json(d: str, obj: Any, sync: bool = True) -> str:
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        # tensorstore's file driver syncs the chunks it writes; sync the record that vouches
        # for them too, so a commit survives a machine crash and not only a process kill
        if sync:
            os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; logs are meant to be read by others
    return tmp


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a partial one."""
    tmp = _write_temp_json(os.path.dirname(path), obj)
    os.replace(tmp, path)


def create_json_exclusive(path: str, obj: Any, sync: bool = True) -> bool:
    """Create ``path`` atomically unless it exists (several writers may race). True if created."""
    tmp = _write_temp_json(os.path.dirname(path), obj, sync)
    try:
        os.link(tmp, path)  # fails if path exists: exactly one creator wins
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def read_json(path: str, what: str, error=ValueError) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what}: missing file {path}") from None
    except json.JSONDecodeError as e:
        raise error(f"{what}: {path} is not valid JSON ({e})") from None


def makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def aligned_empty(shape, dtype) -> np.ndarray:
    """A zeroed host array on a 64-byte boundary (XLA's CPU client can alias such arrays)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + n].view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- zarr arrays


def zarr_spec(path: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def create_array(path: str, shape, chunks, dtype: str, attrs: dict | None = None) -> ts.TensorStore:
    """Create a new zarr array; fails if one exists there (nothing is ever recreated over data)."""
    spec = zarr_spec(path)
    spec["metadata"] = {
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": dtype,
        "compressor": None,  # projected gradients do not compress; blosc would only cost CPU
        "fill_value": None,
    }
    arr = ts.open(spec, create=True).result()
    if attrs:
        atomic_write_json(os.path.join(path, ".zattrs"), attrs)
    return arr


def open_array(path: str, what: str) -> ts.TensorStore:
    if not os.path.exists(os.path.join(path, ".zarray")):
        raise LogFormatError(
            f"{what}: missing zarr array {path}/.zarray (truncated or foreign log directory)"
        )
    return ts.open(zarr_spec(path), open=True).result()


def chunk_keys(array_dir: str) -> list[str]:
    """Names of the chunk files of a zarr v2 array (``0``, ``3.0``, ...)."""
    if not os.path.isdir(array_dir):
        return []
    return [n for n in os.listdir(array_dir) if n[:1].isdigit()]


def check_chunks_present(array_dir: str, rows: int, chunk_rows: int, ndim: int, what: str) -> None:
    """Zarr reads missing chunks as fill values; a committed row must never be missing."""
    suffix = ".0" if ndim == 2 else ""
    names = set(chunk_keys(array_dir))
    for c in range(-(-rows // chunk_rows)):
        if f"{c}{suffix}" not in names:
            raise LogFormatError(
                f"{what}: chunk {c}{suffix} of {array_dir} is missing but rows up to "
                f"{rows} are committed (truncated log)"
            )


def write_array(path: str, value: np.ndarray) -> None:
    a = create_array(path, value.shape, value.shape or (1,), value.dtype.str)
    a.write(value).result()


def read_array(path: str, what: str) -> np.ndarray:
    arr = open_array(path, what)
    check_chunks_present(path, arr.shape[0], arr.chunk_layout.read_chunk.shape[0], arr.rank, what)
    return arr.read().result()


# ----------------------------------------------------------------------------- shards


def shard_names(path: str) -> list[str]:
    d = os.path.join(path, "shards")
    if not os.path.isdir(d):
        return []
    return sorted(
        s for s in os.listdir(d) if WRITER_ID.match(s) and os.path.isdir(os.path.join(d, s))
    )


def committed_rows(shard_dir: str) -> int | None:
    """Rows of a shard's commit record; None for a shard that has not started (no record, no data).

    Raises ``LogFormatError`` for a record that is unreadable or missing while data is present.
    """
    p = os.path.join(shard_dir, COMMIT_FILE)
    if not os.path.exists(p):
        data = chunk_keys(os.path.join(shard_dir, "grads")) + chunk_keys(
            os.path.join(shard_dir, "ids")
        )
        if data:
            raise LogFormatError(
                f"shard {shard_dir} holds data chunks but no commit record {COMMIT_FILE}: "
                "which rows are durable is unknown. To keep rows [0, n) you have checked, write "
                f'{{"rows": n}} to {p}; to drop the shard, delete {shard_dir}'
            )
        return None
    rec = read_json(p, "shard commit record", LogFormatError)
    rows = rec.get("rows") if isinstance(rec, dict) else None
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise LogFormatError(
            f'{p}: invalid commit record {rec!r} (expected {{"rows": n}}); restore it from a '
            f"backup or write the number of rows you have checked, or delete {shard_dir}"
        )
    return rows


# ----------------------------------------------------------------------------- locks


def _proc_start(pid: int) -> str | None:
    """Start time of a process (guards against pid reuse), or None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]  # a zombie has exited
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool | None:
    """True/False for an owner on this host; None when liveness cannot be checked from here."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start(pid)
    if os.path.exists("/proc/self/stat"):  # with /proc: a zombie or a reused pid is not the owner
        return start is not None and start == owner.get("pid_start")
    return True


class ShardLock:
    """An exclusive lock file ``<shard>/lock.json`` naming its owner (host, pid, start time).

    Taken with an atomic exclusive create. A lock left by a process that no longer runs on this
    host is reported (``RuntimeWarning``) and taken over; a live owner, or one on another host
    whose liveness cannot be checked, raises ``LogLockedError`` (after waiting up to ``wait_s``
    seconds for a live owner on this host to release it).
    """

    def __init__(self, directory: str, name: str = LOCK_FILE, wait_s: float = 0.0):
        self.path = os.path.join(directory, name)
        self.wait_s = wait_s
        self._sync = wait_s == 0.0  # a short-lived lock need not survive a machine crash
        self._remove_dir = name == LOCK_FILE
        pid = os.getpid()
        self.owner = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _proc_start(pid),
            "token": uuid.uuid4().hex,
            "since": time.time(),
        }
        self.held = False

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        pause = 1e-4
        tries = 0
        while True:
            if create_json_exclusive(self.path, self.owner, self._sync):
                self.held = True
                return
            try:
                other = read_json(self.path, "lock")
            except ValueError:  # vanished (released) or unreadable: look again
                if os.path.exists(self.path):
                    other = {}
                else:
                    continue
            alive = _alive(other)
            if alive and time.monotonic() < deadline:
                time.sleep(pause)  # a commit lock is held for a few milliseconds
                pause = min(2 * pause, 0.01)
                continue
            if alive:
                raise LogLockedError(
                    f"{os.path.dirname(self.path)} is being written by process "
                    f"{other.get('pid')} on {other.get('host')} (lock {self.path}); use another "
                    "writer_id, or close the other writer first"
                )
            if alive is None:
                raise LogLockedError(
                    f"{os.path.dirname(self.path)} is locked by process {other.get('pid')} "
                    f"on host {other.get('host')!r}, whose liveness cannot be checked from "
                    f"{socket.gethostname()!r}; if that job has ended, delete {self.path}"
                )
            tries += 1
            if tries > 3:
                raise LogLockedError(f"could not take the lock {self.path} (contended)")
            # stale: move it aside (one taker wins the rename), then make sure we moved the
            # stale record and not a lock that a faster taker had just created
            aside = f"{self.path}.stale-{self.owner['token']}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = read_json(aside, "lock") if os.path.exists(aside) else {}
            if moved.get("token") != other.get("token"):
                try:
                    os.link(aside, self.path)
                finally:
                    os.unlink(aside)
                continue
            os.unlink(aside)
            warnings.warn(
                f"stale lock {self.path} of process {other.get('pid')} on "
                f"{other.get('host')} (no longer running) taken over; that writer's committed "
                "rows are kept, its uncommitted rows are dropped",
                RuntimeWarning,
                stacklevel=3,
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            cur = read_json(self.path, "lock")
        except ValueError:
            return
        if cur.get("token") == self.owner["token"]:
            os.unlink(self.path)
            if self._remove_dir:  # a shard that never got rows leaves no directory behind
                try:
                    os.rmdir(os.path.dirname(self.path))
                except OSError:
                    pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------- versions


def write_version(parent: str, name: str, arrays: dict, record_name: str, record: dict) -> bool:
    """Write a complete directory ``parent/name`` (zarr arrays + a JSON record) by one rename.

    The arrays and the record are written into a fresh temp directory beside it, which is then
    renamed into place: readers see the whole version or none of it. Returns False when the
    version already exists (another process wrote it first; its content is the same).
    """
    makedirs(parent)
    final = os.path.join(parent, name)
    if os.path.exists(final):
        return False
    tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex}")
    try:
        makedirs(tmp)
        for rel, value in arrays.items():
            write_array(os.path.join(tmp, rel), np.asarray(value))
        atomic_write_json(os.path.join(tmp, record_name), record)
        os.rename(tmp, final)
        return True
    except OSError:
        if os.path.isdir(final):  # lost the race to an identical version
            return False
        raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
