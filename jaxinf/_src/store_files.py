"""Storage of the log: atomic JSON records, zarr arrays, shard locks, versions.

A log lives in a ``Storage``: the local filesystem (``LocalStorage``, a directory) or any
tensorstore kvstore (``KvStorage``: ``memory``, ``file``, ``s3``, ``gcs``, ...). Every write
is one atomic single-key write (a record replaced whole, a zarr chunk, an exclusive create) or
a version made visible at once (a directory renamed into place; on a kvstore, its record
written last): the commit protocol of ``writer.py`` is built from these steps only. On a
kvstore the exclusive creates and the commit records are conditional writes on the key's
storage generation, so of two writers racing for one key exactly one wins.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from jaxinf._src.store_format import COMMIT_FILE, WRITER_ID, LogFormatError

LOCK_FILE = "lock.json"
COMMIT_LOCK_FILE = "commit.lock"  # log level: held only while one shard's commit record advances


class LogLockedError(RuntimeError):
    """Another live writer holds the shard (same ``writer_id``); the message names the owner."""


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# ----------------------------------------------------------------------------- storages


class LocalStorage:
    """A log in a local (or shared POSIX) directory: records by temp file + ``os.replace``."""

    local = True
    context = None

    def __init__(self, root: str):
        self.root = os.path.abspath(os.fspath(root))

    def where(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def kvstore(self, key: str) -> dict:
        return {"driver": "file", "path": self.where(key)}

    def exists(self, key: str) -> bool:
        return os.path.exists(self.where(key))

    def list(self, key: str) -> list[str]:
        """Names directly under ``key``; directories end with ``/``."""
        try:
            with os.scandir(self.where(key)) as it:
                return sorted(e.name + "/" if e.is_dir() else e.name for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return []


@functools.cache
def _context() -> ts.Context:
    # one context per process: every open of "memory://" sees the same in-memory store
    return ts.Context()


@functools.cache
def _absent() -> bytes:
    """tensorstore's storage generation of a missing key (a write ``if_equal`` it creates)."""
    kv = ts.KvStore.open({"driver": "memory"}, context=ts.Context()).result()
    return kv.read(b"absent").result().stamp.generation


class KvStorage:
    """A log in a tensorstore kvstore (a spec or URL, e.g. ``"memory://log/"``, ``"s3://b/p/"``).

    Records are single-key writes; exclusive creates and commit records are conditional on
    the key's storage generation (``if_equal``), so two writers never both win one key.
    """

    local = False

    def __init__(self, spec):
        if isinstance(spec, ts.KvStore.Spec):
            spec = spec.to_json()
        elif isinstance(spec, str):
            spec = ts.KvStore.Spec(spec).to_json()
        if not isinstance(spec, dict) or "driver" not in spec:
            raise TypeError(f"a kvstore spec must be a dict with a 'driver', got {spec!r}")
        path = spec.get("path", "")
        self.spec = {**spec, "path": path if not path or path.endswith("/") else path + "/"}
        self.context = _context()
        self.kv = ts.KvStore.open(self.spec, context=self.context).result()
        try:
            self.url = self.kv.url
        except Exception:  # no URL form (s3 with an explicit endpoint): name it for messages
            bucket = self.spec.get("bucket")
            base = f"{bucket}/" if bucket else ""
            self.url = f"{self.spec['driver']}://{base}{self.spec['path']}"

    def where(self, key: str) -> str:
        return self.url + key if key else self.url.rstrip("/")

    def kvstore(self, key: str) -> dict:
        return {**self.spec, "path": self.spec["path"] + key + "/"}

    def read(self, key: str) -> tuple[bytes | None, bytes]:
        """(value or None when missing, storage generation)."""
        r = self.kv.read(key).result()
        return (r.value if r.state == "value" else None), r.stamp.generation

    def write(self, key: str, data: bytes | None, if_equal: bytes | None = None) -> bytes | None:
        """Write (or delete, ``data=None``) one key; None when ``if_equal`` did not hold."""
        gen = self.kv.write(key, data, if_equal=if_equal).result().generation
        return None if (if_equal is not None and not gen) else gen

    def exists(self, key: str) -> bool:
        return self.read(key)[0] is not None

    def _range(self, key: str):
        if not key:
            return ts.KvStore.KeyRange()
        p = key + "/"
        return ts.KvStore.KeyRange(p, key + "0")  # "0" follows "/": every key under key/

    def list(self, key: str) -> list[str]:
        """Names directly under ``key``; prefixes of deeper keys end with ``/``."""
        strip = len(key) + 1 if key else 0
        names = set()
        for k in self.kv.list(self._range(key), strip_prefix_length=strip).result():
            head, sep, _ = k.decode().partition("/")
            names.add(head + sep)
        return sorted(names)

    def delete_tree(self, key: str) -> None:
        self.kv.delete_range(self._range(key)).result()


def open_storage(location) -> LocalStorage | KvStorage:
    """A path -> ``LocalStorage``; a URL (``"memory://..."``) or kvstore spec -> ``KvStorage``."""
    if isinstance(location, (LocalStorage, KvStorage)):
        return location
    if isinstance(location, (dict, ts.KvStore.Spec)) or (
        isinstance(location, str) and "://" in location
    ):
        return KvStorage(location)
    if isinstance(location, (str, os.PathLike)):
        return LocalStorage(location)
    raise TypeError(
        f"a log location is a path, a kvstore URL or a kvstore spec dict, got {location!r}"
    )


class Loc(NamedTuple):
    """A key in a storage: ``loc / "name"`` is the key below it; ``str(loc)`` names it."""

    st: LocalStorage | KvStorage
    key: str

    def __truediv__(self, name: str) -> Loc:
        return Loc(self.st, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return self.st.where(self.key)

    @property
    def path(self) -> str:
        return self.st.where(self.key)


def location(where) -> Loc:
    """The root ``Loc`` of a path, URL, kvstore spec or storage (a ``Loc`` is returned as is)."""
    if isinstance(where, Loc):
        return where
    return Loc(open_storage(where), "")


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


def atomic_write_json(loc, obj: Any, if_equal: bytes | None = None) -> bytes | None:
    """Write JSON so that readers see the old or the new record, never a partial one.

    On a kvstore, ``if_equal`` makes the write conditional on the key's storage generation;
    returns the new generation, or None when the condition did not hold (on the local
    filesystem the condition is not checked and ``b""`` is returned).
    """
    loc = location(loc)
    if loc.st.local:
        tmp = _write_temp_json(os.path.dirname(loc.path), obj)
        os.replace(tmp, loc.path)
        return b""
    return loc.st.write(loc.key, _json_bytes(obj), if_equal)


def create_json_exclusive(loc, obj: Any, sync: bool = True) -> bool:
    """Create a record atomically unless it exists (several writers may race). True if created."""
    loc = location(loc)
    if not loc.st.local:
        return loc.st.write(loc.key, _json_bytes(obj), _absent()) is not None
    tmp = _write_temp_json(os.path.dirname(loc.path), obj, sync)
    try:
        os.link(tmp, loc.path)  # fails if path exists: exactly one creator wins
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def generation(loc) -> bytes | None:
    """Storage generation of a record (kvstore), ``_absent()`` if missing; None on a local disk."""
    loc = location(loc)
    return None if loc.st.local else loc.st.read(loc.key)[1]


def read_json(loc, what: str, error=ValueError) -> Any:
    loc = location(loc)
    try:
        if loc.st.local:
            with open(loc.path) as f:
                return json.load(f)
        data = loc.st.read(loc.key)[0]
        if data is None:
            raise FileNotFoundError(loc.path)
        return json.loads(data)
    except FileNotFoundError:
        raise error(f"{what}: missing file {loc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what}: {loc} is not valid JSON ({e})") from None


def exists(loc) -> bool:
    loc = location(loc)
    return loc.st.exists(loc.key)


def makedirs(loc) -> None:
    loc = location(loc)
    if loc.st.local:  # a kvstore has no directories
        os.makedirs(loc.path, exist_ok=True)


def aligned_empty(shape, dtype) -> np.ndarray:
    """A zeroed host array on a 64-byte boundary (XLA's CPU client can alias such arrays)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + n].view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- zarr arrays


def zarr_spec(loc) -> dict:
    loc = location(loc)
    return {"driver": "zarr", "kvstore": loc.st.kvstore(loc.key)}


def _ts_open(loc: Loc, spec: dict, **kw) -> ts.TensorStore:
    if loc.st.context is not None:
        kw["context"] = loc.st.context
    return ts.open(spec, **kw).result()


def create_array(
    loc, shape, chunks, dtype: str, attrs: dict | None = None, reuse: bool = False
) -> ts.TensorStore:
    """Create a new zarr array; fails if one exists there (nothing is ever recreated over data).

    ``reuse=True`` opens an existing array of the same metadata instead (a version being
    written again after a crash, on a kvstore).
    """
    loc = location(loc)
    spec = zarr_spec(loc)
    spec["metadata"] = {
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": dtype,
        "compressor": None,  # projected gradients do not compress; blosc would only cost CPU
        "fill_value": None,
    }
    arr = _ts_open(loc, spec, create=True, open=reuse)
    if attrs:
        atomic_write_json(loc / ".zattrs", attrs)
    return arr


def open_array(loc, what: str) -> ts.TensorStore:
    loc = location(loc)
    if not exists(loc / ".zarray"):
        raise LogFormatError(
            f"{what}: missing zarr array {loc}/.zarray (truncated or foreign log directory)"
        )
    return _ts_open(loc, zarr_spec(loc), open=True)


def chunk_keys(loc) -> list[str]:
    """Names of the chunk files of a zarr v2 array (``0``, ``3.0``, ...)."""
    loc = location(loc)
    return [n for n in loc.st.list(loc.key) if n[:1].isdigit() and not n.endswith("/")]


def check_chunks_present(loc, rows: int, chunk_rows: int, ndim: int, what: str) -> None:
    """Zarr reads missing chunks as fill values; a committed row must never be missing."""
    suffix = ".0" if ndim == 2 else ""
    names = set(chunk_keys(loc))
    for c in range(-(-rows // chunk_rows)):
        if f"{c}{suffix}" not in names:
            raise LogFormatError(
                f"{what}: chunk {c}{suffix} of {location(loc)} is missing but rows up to "
                f"{rows} are committed (truncated log)"
            )


def write_array(loc, value: np.ndarray, reuse: bool = False) -> None:
    a = create_array(loc, value.shape, value.shape or (1,), value.dtype.str, reuse=reuse)
    a.write(value).result()


def read_array(loc, what: str) -> np.ndarray:
    arr = open_array(loc, what)
    check_chunks_present(loc, arr.shape[0], arr.chunk_layout.read_chunk.shape[0], arr.rank, what)
    return arr.read().result()


# ----------------------------------------------------------------------------- shards


def shard_names(root) -> list[str]:
    root = location(root)
    d = root / "shards"
    return [n[:-1] for n in d.st.list(d.key) if n.endswith("/") and WRITER_ID.match(n[:-1])]


def committed_rows(shard) -> int | None:
    """Rows of a shard's commit record; None for a shard that has not started (no record, no data).

    Raises ``LogFormatError`` for a record that is unreadable or missing while data is present.
    """
    shard = location(shard)
    p = shard / COMMIT_FILE
    if not exists(p):
        data = chunk_keys(shard / "grads") + chunk_keys(shard / "ids")
        if data:
            raise LogFormatError(
                f"shard {shard} holds data chunks but no commit record {COMMIT_FILE}: "
                "which rows are durable is unknown. To keep rows [0, n) you have checked, write "
                f'{{"rows": n}} to {p}; to drop the shard, delete {shard}'
            )
        return None
    rec = read_json(p, "shard commit record", LogFormatError)
    rows = rec.get("rows") if isinstance(rec, dict) else None
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise LogFormatError(
            f'{p}: invalid commit record {rec!r} (expected {{"rows": n}}); restore it from a '
            f"backup or write the number of rows you have checked, or delete {shard}"
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


def _remove_if_token(loc: Loc, token) -> bool:
    """Remove the record at ``loc`` only if it still carries ``token``; True if removed.

    Atomic against other removers and creators: on a local disk the record is moved aside (one
    taker wins the rename) and put back if it was not the one expected; on a kvstore the delete
    is conditional on the generation that was read.
    """
    if not loc.st.local:
        data, gen = loc.st.read(loc.key)
        try:
            cur = json.loads(data) if data is not None else None
        except ValueError:
            cur = {}
        if not isinstance(cur, dict) or cur.get("token") != token:
            return False
        return loc.st.write(loc.key, None, gen) is not None
    aside = f"{loc.path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(loc.path, aside)
    except FileNotFoundError:
        return False
    moved = read_json(aside, "lock") if os.path.exists(aside) else {}
    if moved.get("token") != token:  # a faster taker had just created a new lock: put it back
        try:
            os.link(aside, loc.path)
        finally:
            os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def _read_lock(loc: Loc) -> dict | None:
    """A lock's owner record; None if there is none, ``{}`` if it is unreadable (damaged)."""
    try:
        if loc.st.local:
            with open(loc.path) as f:
                rec = json.load(f)
        else:
            data = loc.st.read(loc.key)[0]
            if data is None:
                return None
            rec = json.loads(data)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


class ShardLock:
    """An exclusive lock record ``<shard>/lock.json`` naming its owner (host, pid, start time).

    Taken with an atomic exclusive create (on a kvstore, a write conditional on the key being
    absent). A lock left by a process that no longer runs on this host is reported
    (``RuntimeWarning``) and taken over; a live owner, or one on another host whose liveness
    cannot be checked, raises ``LogLockedError`` (after waiting up to ``wait_s`` seconds for a
    live owner on this host to release it).
    """

    def __init__(self, directory, name: str = LOCK_FILE, wait_s: float = 0.0):
        self.directory = location(directory)
        self.path = self.directory / name
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
            other = _read_lock(self.path)
            if other is None:  # released meanwhile: try again
                continue
            alive = _alive(other)
            if alive and time.monotonic() < deadline:
                time.sleep(pause)  # a commit lock is held for a few milliseconds
                pause = min(2 * pause, 0.01)
                continue
            if alive:
                raise LogLockedError(
                    f"{self.directory} is being written by process "
                    f"{other.get('pid')} on {other.get('host')} (lock {self.path}); use another "
                    "writer_id, or close the other writer first"
                )
            if alive is None:
                raise LogLockedError(
                    f"{self.directory} is locked by process {other.get('pid')} "
                    f"on host {other.get('host')!r}, whose liveness cannot be checked from "
                    f"{socket.gethostname()!r}; if that job has ended, delete {self.path}"
                )
            tries += 1
            if tries > 3:
                raise LogLockedError(f"could not take the lock {self.path} (contended)")
            # stale: remove exactly the record that was read (a faster taker's lock is kept)
            if not _remove_if_token(self.path, other.get("token")):
                continue
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
        loc = self.path
        if not loc.st.local:
            _remove_if_token(loc, self.owner["token"])
            return
        try:
            cur = read_json(loc, "lock")
        except ValueError:
            return
        if cur.get("token") == self.owner["token"]:
            os.unlink(loc.path)
            if self._remove_dir:  # a shard that never got rows leaves no directory behind
                try:
                    os.rmdir(self.directory.path)
                except OSError:
                    pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------- versions


def has_version(loc, record_name: str) -> bool:
    """A version exists once it is in place: renamed (local) or its record written (kvstore)."""
    loc = location(loc)
    return os.path.isdir(loc.path) if loc.st.local else exists(loc / record_name)


def write_version(parent, name: str, arrays: dict, record_name: str, record: dict) -> bool:
    """Write a complete version ``parent/name`` (zarr arrays + a JSON record) made visible at once.

    On a local disk the arrays and the record are written into a fresh temp directory beside
    it, which is then renamed into place. On a kvstore (no rename) the arrays are written under
    their final keys and the record last, by an exclusive create: readers accept a version only
    once its record exists. Either way readers see the whole version or none of it. Returns
    False when the version already exists (another process wrote it first; its content is the
    same).
    """
    parent = location(parent)
    final = parent / name
    if not parent.st.local:
        if exists(final / record_name):
            return False
        for rel, value in arrays.items():
            write_array(final / rel, np.asarray(value), reuse=True)
        return create_json_exclusive(final / record_name, record)
    makedirs(parent)
    if os.path.exists(final.path):
        return False
    tmp = os.path.join(parent.path, f".tmp-{name}-{uuid.uuid4().hex}")
    try:
        makedirs(tmp)
        for rel, value in arrays.items():
            write_array(os.path.join(tmp, rel), np.asarray(value))
        atomic_write_json(os.path.join(tmp, record_name), record)
        os.rename(tmp, final.path)
        return True
    except OSError:
        if os.path.isdir(final.path):  # lost the race to an identical version
            return False
        raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_version(loc, record_name: str) -> None:
    """Delete a version so that no reader sees half of it (best effort)."""
    loc = location(loc)
    if not loc.st.local:  # the record first: without it the version does not exist
        loc.st.write((loc / record_name).key, None)
        loc.st.delete_tree(loc.key)
        return
    parent, name = os.path.split(loc.path)
    trash = os.path.join(parent, f".trash-{name}-{uuid.uuid4().hex}")
    try:
        os.rename(loc.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError:
        pass
