"""Disk memoisation keyed by content, so a reopened link or a rerun costs nothing.

A key is a hash of the *content* of the inputs (array bytes, a model's weight fingerprint, a
spec's JSON), of the function's name, and of the source of the modules it depends on plus the
versions of the numeric libraries: editing the science invalidates exactly what it touches.
Nothing is cached unless a ``DiskCache`` is passed: uploaded photos stay in memory by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import sqlite3
import time
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, cast

import diskcache
import numpy as np

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "XAI_CACHE_DIR"
CACHE_SIZE_ENV = "XAI_CACHE_SIZE_GB"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "results"
DEFAULT_SIZE_GB = 4.0
_LIBRARIES = ("torch", "torchvision", "captum", "zennit", "numpy", "scikit-image", "segmentation-models-pytorch")


def _library_versions() -> str:
    versions = []
    for name in _LIBRARIES:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=absent")
    return ",".join(versions)


def _feed(h: hashlib.blake2b, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into ``h``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(b"J" + json.dumps(obj).encode())
    elif isinstance(obj, bytes):
        h.update(b"B%d:" % len(obj) + obj)
    elif isinstance(obj, np.ndarray) or (type(obj).__module__ == "torch" and type(obj).__name__ == "Tensor"):
        array = np.ascontiguousarray(obj.detach().cpu().numpy() if hasattr(obj, "detach") else obj)
        h.update(f"A{array.dtype.str}{array.shape}".encode())
        h.update(array.data.cast("B"))  # array.data is memoryview(array)
    elif isinstance(getattr(obj, "fingerprint", None), str):
        # Models (classifier, face parser) are identified by their weights, never by object identity.
        h.update(b"F" + obj.fingerprint.encode())
    elif hasattr(obj, "to_json"):
        h.update(b"S" + type(obj).__name__.encode() + obj.to_json().encode())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(b"D" + type(obj).__name__.encode())
        for f in dataclasses.fields(obj):
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        h.update(b"M%d" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    else:
        raise TypeError(
            f"cannot build a content key from a {type(obj).__name__}; pass arrays, specs or fingerprinted models"
        )


def content_hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def source_salt(*modules: types.ModuleType) -> str:
    """Hash of the modules' source and the numeric libraries' versions: the code-version salt."""
    h = hashlib.blake2b(digest_size=12)
    h.update(_library_versions().encode())
    for module in modules:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()


MISSING = object()


_DAMAGED_DATABASE = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # not "locked" or "busy": those are waits


def _move_aside(directory: Path) -> Path | None:
    """Rename a damaged cache folder to ``<dir>.damaged-<timestamp>``, kept for the user to inspect or
    delete; None when another process opening the same cache moved it first."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    attempt = 0
    while True:  # not itertools.count(): mypy knows this loop only ends by returning
        target = directory.with_name(f"{directory.name}.damaged-{stamp}" + (f"-{attempt}" if attempt else ""))
        attempt += 1
        if target.exists():
            continue
        try:
            directory.rename(target)
        except FileNotFoundError:
            return None
        return target


# A disk that is full, read-only or not there: the cache steps aside and results are computed without it.
_UNWRITABLE = (
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_PERM,
)


def unusable(error: BaseException) -> str | None:
    """Why the cache cannot be used, when ``error`` says its disk is full, read-only or unreachable (an
    ``OSError`` such as ENOSPC, EROFS, EACCES, or SQLite's full/read-only/cannot-open/I/O errors); None for
    any other error. The reason names no path (SQLite's messages do not; of an ``OSError`` only its
    errno's description is kept)."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return str(error) if code is not None and code & 0xFF in _UNWRITABLE else None
    if isinstance(error, OSError):  # the system's words for its errno: diskcache's own strerror names the folder
        return os.strerror(error.errno) if error.errno else type(error).__name__
    return None


class DiskCache:
    """A size-bounded diskcache whose damaged entries are dropped and recomputed, never fatal.

    A damaged database (``cache.db`` overwritten or truncated) is moved aside whole, never deleted,
    and a fresh cache starts in its place: results are recomputed instead of the app failing.
    A cache whose disk is full or read-only (or whose folder cannot be created) gives up instead:
    ``problem`` says why, every lookup misses, nothing is stored, and the caller's work goes on.
    ``expire_days``: every entry stored expires that long after it was stored (``prune`` removes the
    expired ones from disk; opening the cache prunes once).
    """

    def __init__(
        self, directory: str | Path | None = None, size_limit_gb: float | None = None, expire_days: float | None = None
    ):
        self.directory = Path(directory or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)
        self.problem: str | None = None
        self._expire = None if expire_days is None else expire_days * 86400.0
        size_gb = size_limit_gb if size_limit_gb is not None else float(os.environ.get(CACHE_SIZE_ENV, DEFAULT_SIZE_GB))
        settings = {"size_limit": int(size_gb * 2**30), "eviction_policy": "least-recently-used"}
        self._store: diskcache.Cache | None = None
        try:
            self._store = self._open(settings)
            if self._expire is not None:
                self._store.expire(retry=True)
        except (OSError, sqlite3.Error) as error:
            self._give_up(error)

    def _open(self, settings: dict[str, Any]) -> diskcache.Cache:
        try:
            return diskcache.Cache(str(self.directory), **settings)
        except sqlite3.DatabaseError as error:
            if getattr(error, "sqlite_errorcode", None) not in _DAMAGED_DATABASE:
                raise
            moved = _move_aside(self.directory)
            log.warning(
                "the cache database in %s is damaged (%s); %s, starting a fresh cache: results will be recomputed",
                self.directory,
                error,
                f"moved the folder to {moved}" if moved else "another process moved the folder aside",
            )
            return diskcache.Cache(str(self.directory), **settings)

    def _give_up(self, error: BaseException) -> None:
        """Stop using the disk when ``error`` says it is full or read-only; re-raise any other error."""
        reason = unusable(error)
        if reason is None:
            raise error
        if self.problem is None:
            log.warning("the result cache cannot be used (%s): results are computed but not cached", reason)
        self.problem = reason
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def lookup(self, key: str) -> Any:
        """The stored value, or ``MISSING``; a damaged entry is deleted and reported as missing."""
        if self._store is None:
            return MISSING
        try:
            return self._store.get(key, default=MISSING, retry=True)
        except Exception as error:  # a truncated value file, a bad pickle, a broken row; or a failing disk
            if unusable(error) is not None and not isinstance(error, FileNotFoundError):
                self._give_up(error)
                return MISSING
            log.warning("cache entry %s was damaged (%s); recomputing", key[:12], type(error).__name__)
            try:
                self._store.delete(key, retry=True)
            except (OSError, sqlite3.Error) as failure:
                self._give_up(failure)
            return MISSING

    def store(self, key: str, value: Any) -> None:
        if self._store is None:
            return
        try:
            self._store.set(key, value, expire=self._expire, retry=True)
        except (OSError, sqlite3.Error) as error:
            self._give_up(error)

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        value = self.lookup(key)
        if value is MISSING:
            value = compute()
            self.store(key, value)
        return value

    def __contains__(self, key: str) -> bool:
        return self._store is not None and key in self._store

    def __len__(self) -> int:
        """Entries stored (expired ones not yet pruned included)."""
        return 0 if self._store is None else len(self._store)

    def prune(self) -> int:
        """Remove the expired entries from disk; how many."""
        if self._store is None:
            return 0
        try:
            return int(self._store.expire(retry=True))
        except (OSError, sqlite3.Error) as error:
            self._give_up(error)
            return 0

    def clear(self) -> None:
        if self._store is not None:
            self._store.clear(retry=True)

    def volume(self) -> int:
        return 0 if self._store is None else int(self._store.volume())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def memo_key(namespace: str, salt: str, *parts: Any) -> str:
    return content_hash(namespace, salt, *parts)


class Memoised(Protocol):
    """What ``memoised`` returns: the function, taking ``cache=``, with its code-version ``salt()``."""

    salt: Callable[[], str]

    def __call__(self, *args: Any, cache: DiskCache | None = None, **kwargs: Any) -> Any: ...


def memoised(namespace: str, depends: tuple[types.ModuleType, ...] = ()):
    """Decorate a pure function so that ``f(..., cache=DiskCache)`` is looked up by content first.

    ``depends``: the modules whose source decides the result (the decorated function's own module
    is always included). Without ``cache`` (the default) the function simply runs.
    """

    def decorate(function):
        @functools.lru_cache(maxsize=1)
        def salt() -> str:
            module = inspect.getmodule(function)
            if module is None:  # inspect.getsource(None) would fail just the same
                raise TypeError(f"cannot find the module of {function!r} to salt its cache keys")
            return source_salt(module, *depends)

        @functools.wraps(function)
        def wrapper(*args, cache: DiskCache | None = None, **kwargs):
            if cache is None:
                return function(*args, **kwargs)
            key = memo_key(namespace, salt(), args, kwargs)
            return cache.get_or_compute(key, lambda: function(*args, **kwargs))

        memoised_function = cast(Memoised, wrapper)
        memoised_function.salt = salt
        return memoised_function

    return decorate


def memoised_rows(cache: DiskCache | None, keys: list[str], compute: Callable[[list[int]], list[Any]]) -> list[Any]:
    """One value per key: looked up in ``cache``, the missing rows computed by ``compute(rows)`` as one
    batch and stored. So a resumed batch computes only what is missing; without a cache all rows run."""
    if cache is None:
        return compute(list(range(len(keys))))
    found = [cache.lookup(key) for key in keys]
    todo = [i for i, value in enumerate(found) if value is MISSING]
    if todo:
        for i, value in zip(todo, compute(todo), strict=True):
            found[i] = value
            cache.store(keys[i], value)
    return found
