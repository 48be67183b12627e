import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import MISSING, DiskCache, content_hash, memoised

calls: list[int] = []


@memoised("test-double")
def doubled(array, factor=2):
    calls.append(1)
    return array * factor


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    sizes: tuple


@dataclasses.dataclass(frozen=True)
class Fingerprinted:
    fingerprint: str
    network: object = None


def test_content_hash_follows_content_not_identity():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert content_hash(a) == content_hash(a.copy())
    assert content_hash(a) == content_hash(torch.from_numpy(a.copy()))
    assert content_hash(a) != content_hash(a.astype(np.float64))  # dtype matters
    assert content_hash(a) != content_hash(a.reshape(4, 3))  # shape matters
    b = a.copy()
    b[1, 1] += 1
    assert content_hash(a) != content_hash(b)
    assert content_hash({"x": 1, "y": [1, 2]}) == content_hash({"y": [1, 2], "x": 1})
    assert content_hash(Spec("eye", (1, 2))) != content_hash(Spec("eye", (1, 3)))
    # Models hash by weights fingerprint: two objects, same weights, same key.
    assert content_hash(Fingerprinted("abc", object())) == content_hash(Fingerprinted("abc", object()))
    assert content_hash(1) != content_hash(1.0) != content_hash("1")


def test_unhashable_inputs_are_refused_loudly():
    with pytest.raises(TypeError, match="cannot build a content key"):
        content_hash(object())


def test_memoised_computes_once_and_survives_reopening(tmp_path):
    calls.clear()
    x = np.arange(5)
    cache = DiskCache(tmp_path / "c")
    np.testing.assert_array_equal(doubled(x, cache=cache), x * 2)
    np.testing.assert_array_equal(doubled(x.copy(), cache=cache), x * 2)
    assert len(calls) == 1
    cache.close()
    reopened = DiskCache(tmp_path / "c")
    np.testing.assert_array_equal(doubled(x, cache=reopened), x * 2)
    assert len(calls) == 1
    doubled(x, factor=3, cache=reopened)
    assert len(calls) == 2


def test_without_a_cache_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls.clear()
    doubled(np.arange(3))
    doubled(np.arange(3))
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_entry_is_recomputed(tmp_path):
    calls.clear()
    cache = DiskCache(tmp_path / "c")
    big = np.arange(100_000, dtype=np.float64)  # large enough that diskcache keeps it in a file
    doubled(big, cache=cache)
    files = list((tmp_path / "c").rglob("*.val"))
    assert files, "expected the value in its own file"
    for path in files:
        path.write_bytes(b"garbage")
    np.testing.assert_array_equal(doubled(big, cache=cache), big * 2)
    assert len(calls) == 2
    for path in files:
        path.unlink(missing_ok=True)
    cache.close()
    cache = DiskCache(tmp_path / "c")
    # The value file of the recomputed entry was written anew; delete every value file: still fine.
    for path in (tmp_path / "c").rglob("*.val"):
        path.unlink()
    np.testing.assert_array_equal(doubled(big, cache=cache), big * 2)
    assert len(calls) == 3


def _overwrite(path: Path) -> None:
    path.write_bytes(b"this is not a SQLite database" * 100)


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_overwrite, _truncate])
def test_a_damaged_database_is_moved_aside_whole_and_the_cache_starts_afresh(tmp_path, caplog, damage):
    calls.clear()
    x = np.arange(5)
    cache = DiskCache(tmp_path / "c")
    for i in range(50):  # enough rows that half the database file cuts into them
        doubled(x + i, cache=cache)
    big = np.arange(100_000, dtype=np.float64)
    doubled(big, cache=cache)  # a value in a file of its own: it must be moved along, not deleted
    cache.close()
    damage(tmp_path / "c" / "cache.db")
    before = {p.relative_to(tmp_path / "c"): p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    calls.clear()
    with caplog.at_level("WARNING", logger="cache"):
        reopened = DiskCache(tmp_path / "c")
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("c.damaged-")]
    assert len(moved) == 1
    # Every byte of the user's old folder is still there, under the new name (next to the journal
    # files SQLite itself may add while trying to open the damaged database).
    after = {p.relative_to(moved[0]): p.read_bytes() for p in moved[0].rglob("*") if p.is_file()}
    assert {k: after.get(k) for k in before} == before
    assert {p.name for p in set(after) - set(before)} <= {"cache.db-wal", "cache.db-shm"}
    assert f"moved the folder to {moved[0]}" in caplog.text and "damaged" in caplog.text
    np.testing.assert_array_equal(doubled(x, cache=reopened), x * 2)
    np.testing.assert_array_equal(doubled(x, cache=reopened), x * 2)
    assert len(calls) == 1  # recomputed once, then served by the fresh cache
    reopened.close()
    assert DiskCache(tmp_path / "c").lookup("nothing") is MISSING  # the fresh one reopens without a move
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("c.damaged-")]) == 1


def test_a_second_damaged_database_within_the_same_second_gets_its_own_name(tmp_path):
    for _ in range(2):
        DiskCache(tmp_path / "c").close()
        _overwrite(tmp_path / "c" / "cache.db")
        DiskCache(tmp_path / "c").close()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("c.damaged-")]) == 2


def test_a_locked_database_is_not_taken_for_a_damaged_one(tmp_path, monkeypatch):
    """Only corruption moves the folder; another process holding the lock too long is an error to report."""
    import sqlite3

    import diskcache

    DiskCache(tmp_path / "c").close()

    def locked(*args, **kwargs):
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise error

    monkeypatch.setattr(diskcache, "Cache", locked)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        DiskCache(tmp_path / "c")
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_size_limit_evicts_and_keeps_working(tmp_path):
    cache = DiskCache(tmp_path / "c", size_limit_gb=2 / 1024)  # 2 MB
    for i in range(40):
        doubled(np.full(50_000, i, dtype=np.float64), cache=cache)  # 400 KB each
    assert cache.volume() < 4 * 2**20
    np.testing.assert_array_equal(doubled(np.full(50_000, 39.0), cache=cache), np.full(50_000, 78.0))


def test_editing_a_dependency_changes_the_key(tmp_path):
    module = type(sys)("fake_science")
    path = tmp_path / "fake_science.py"
    path.write_text("K = 1\n")
    module.__file__ = str(path)
    from cache import source_salt

    sys.modules["fake_science"] = module
    try:
        before = source_salt(module)
        path.write_text("K = 2\n")
        import linecache

        linecache.clearcache()
        assert source_salt(module) != before
    finally:
        del sys.modules["fake_science"]


def test_default_directory_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "elsewhere"))
    cache = DiskCache()
    assert cache.directory == Path(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere").is_dir()


def test_a_cache_folder_that_cannot_be_created_steps_aside_and_the_work_goes_on(tmp_path, caplog):
    """A path under a regular file (ENOTDIR), like a read-only or full disk: no exception, results computed,
    nothing stored, and the reason names no path."""
    (tmp_path / "file").write_text("not a folder")
    calls.clear()
    with caplog.at_level("WARNING", logger="cache"):
        cache = DiskCache(tmp_path / "file" / "cache")
    assert cache.problem == "Not a directory"
    x = np.arange(4)
    np.testing.assert_array_equal(doubled(x, cache=cache), x * 2)
    np.testing.assert_array_equal(doubled(x, cache=cache), x * 2)
    assert len(calls) == 2  # nothing was cached
    assert cache.volume() == 0 and "k" not in cache
    assert str(tmp_path) not in caplog.text and "results are computed but not cached" in caplog.text


def _full(*args, **kwargs):
    import sqlite3

    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    raise error


def test_a_full_disk_while_storing_gives_up_caching_without_failing(tmp_path, monkeypatch):
    import diskcache

    cache = DiskCache(tmp_path / "c")
    x = np.arange(3)
    doubled(x, cache=cache)  # stored while the disk had room
    monkeypatch.setattr(diskcache.Cache, "set", _full)
    calls.clear()
    y = np.arange(5)
    np.testing.assert_array_equal(doubled(y, cache=cache), y * 2)
    assert cache.problem == "database or disk is full"
    np.testing.assert_array_equal(doubled(x, cache=cache), x * 2)  # the cache is no longer read either
    assert len(calls) == 2


def test_a_read_only_disk_is_a_reason_without_a_path_and_other_errors_still_raise(tmp_path, monkeypatch):
    import errno
    import os
    import sqlite3

    import diskcache

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "c" / "ab" / "cd.val"))

    cache = DiskCache(tmp_path / "c")
    monkeypatch.setattr(diskcache.Cache, "set", read_only)
    cache.store("k", b"v")
    assert cache.problem == "Read-only file system"

    def locked(*args, **kwargs):
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise error

    other = DiskCache(tmp_path / "d")
    monkeypatch.setattr(diskcache.Cache, "set", locked)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.store("k", b"v")
    assert other.problem is None


def test_entries_expire_after_their_days_and_leave_the_disk(tmp_path, monkeypatch):
    """Entries planted 8 and 6 days ago in a cache whose entries live 7 days: reopening removes the old one,
    its value file included; the young one is still served."""
    import time

    now = time.time()
    big = np.arange(200_000, dtype=np.float64)  # a value in a file of its own
    for age, key, value in ((8, "old", big), (6, "young", b"young")):
        monkeypatch.setattr(time, "time", lambda age=age: now - age * 86400)
        planted = DiskCache(tmp_path / "uploads", expire_days=7)
        planted.store(key, value)
        planted.close()
        monkeypatch.undo()
    files = set((tmp_path / "uploads").rglob("*.val"))
    assert len(files) == 1
    cache = DiskCache(tmp_path / "uploads", expire_days=7)
    assert cache.lookup("old") is MISSING and "old" not in cache
    assert cache.lookup("young") == b"young"
    assert not any(p.exists() for p in files)  # the old photo's result is gone from disk, not only hidden
    cache.store("new", b"new")
    assert cache.prune() == 0 and cache.lookup("new") == b"new"
