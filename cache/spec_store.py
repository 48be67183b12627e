"""Region specs kept on the server by their content id, so a short URL (``?spec=3fa2…``) names an edited spec.

A spec is written once under ``<id>.json`` (the id is ``core.regions.spec_id``, a hash of its
canonical JSON), so the same edit always lands in the same file and a link stays valid while the
spec is in use. Writes go to a temporary file and are renamed into place, so two sessions saving at
once, or a crash halfway, never leave a torn file behind. Bundled specs (``core/region_specs/*.json``)
are addressable by their name as well; they are never stored here, so pruning never touches them.

Bounded (issue 13): a spec is saved or loaded only within the ``Limits`` caps (JSON bytes, regions,
name length; a stored file is measured before it is read), and a stored spec unused for
``Limits.spec_days`` is pruned: loading or saving a spec marks it used (its file's mtime, refreshed at
most once a day), and ``prune`` (run by ``save`` at most once a day, and by ``python -m core
prune-specs``) deletes the files not marked within that many days.

The race between pruning and a reader: ``load`` and ``save`` hold a shared ``flock`` on ``.lock`` while
they mark and read a file, and ``prune`` holds it exclusively while it checks and deletes, so a spec
being read right now has just been marked and is never deleted under its reader. A session that already
shows a pruned spec keeps it (the page holds the spec, not the file), and an edit stores it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
from core.deployment import Limits
from core.errors import RegionSpecError, UserFacingError
from core.regions import RegionSpec, SpecCaps, bundled_region_specs, check_caps, shown, spec_id

_ID = re.compile(r"^[0-9a-f]{12}$")
_LOCK, _PRUNED = ".lock", ".pruned"
_DAY = 24 * 3600.0
_MARK_EVERY = _DAY  # a spec's use is recorded at most this often (no disk write on every page run)


class UnknownSpecError(UserFacingError):
    """A spec reference names neither a bundled spec nor a stored one."""


def default_spec_dir() -> Path:
    """``specs/`` beside the result cache (``$XAI_CACHE_DIR/../specs``, else ``<repo>/.cache/specs``)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).parent / "specs"


def spec_caps(limits: Limits) -> SpecCaps:
    """The spec caps of a deployment's limits (local mode: ``Limits()``, the same defaults)."""
    return SpecCaps(spec_bytes=limits.spec_bytes, regions=limits.spec_regions, name_chars=limits.name_chars)


class SpecStore:
    """Content-addressed JSON files, one per region spec, within ``limits``' caps and kept ``limits.spec_days``
    after their last use."""

    def __init__(self, root: str | Path | None = None, limits: Limits | None = None):
        self.root = Path(root) if root is not None else default_spec_dir()
        self.limits = limits = limits if limits is not None else Limits()
        self.caps = spec_caps(limits)

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        """``flock`` on the store's lock file; a store that cannot hold one (a read-only folder, where nothing
        is pruned either) goes without."""
        try:
            handle = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError:
            yield
            return
        try:
            fcntl.flock(handle, operation)
            yield
        finally:
            os.close(handle)  # closing releases the lock

    def save(self, spec: RegionSpec) -> str:
        """Store ``spec`` (idempotent) and return its id; a spec over the caps raises ``RegionSpecError``."""
        check_caps(spec, self.caps)
        identifier = spec_id(spec)
        path = self.root / f"{identifier}.json"
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_SH):
            if path.is_file():
                _mark_used(path)
                return identifier
            handle, temporary = tempfile.mkstemp(dir=self.root, prefix=f".{identifier}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as file:
                    file.write(spec.to_json())
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        self._prune_daily()
        return identifier

    def load(self, identifier: str) -> RegionSpec:
        """The stored spec with this id; a damaged, edited or oversized file is refused, since its id would lie.
        Messages name the id only (never the server's folder)."""
        if not isinstance(identifier, str) or not _ID.match(identifier):
            raise UnknownSpecError(
                f"{shown(identifier)} is not a region spec id (12 hex digits) nor a bundled spec name"
            )
        path = self.root / f"{identifier}.json"
        with self._locked(fcntl.LOCK_SH):
            try:
                status = path.stat()
            except OSError:
                status = None
            if status is None or not stat.S_ISREG(status.st_mode):
                raise UnknownSpecError(
                    f"region spec {identifier} is not stored on this server (a spec unused for "
                    f"{self.limits.spec_days} days is pruned)"
                )
            if status.st_size > self.caps.spec_bytes:
                raise UnknownSpecError(
                    f"region spec {identifier} is larger than this server takes ({self.caps.spec_bytes} bytes)"
                )
            _mark_used(path, status.st_mtime)
            try:
                with path.open("rb") as file:
                    text = file.read(self.caps.spec_bytes + 1)
                spec = RegionSpec.from_json(text, caps=self.caps)
            except RegionSpecError as error:
                raise UnknownSpecError(f"region spec {identifier} cannot be read: {error}") from None
            except OSError:  # its text would name the server's folder
                raise UnknownSpecError(f"region spec {identifier} cannot be read") from None
        if spec_id(spec) != identifier:
            raise UnknownSpecError(f"region spec {identifier} was changed after it was stored (its content id differs)")
        return spec

    def resolve(self, reference: str) -> RegionSpec:
        """A bundled spec by name (``paper``, ``extended``) or a stored one by id."""
        bundled = bundled_region_specs()
        if reference in bundled:
            return bundled[reference]
        return self.load(reference)

    def reference(self, spec: RegionSpec) -> str:
        """The short name to put in a URL: a bundled spec's name when it is one, else its stored id."""
        for name, bundled in bundled_region_specs().items():
            if bundled == spec:
                return name
        return self.save(spec)

    def prune(self, days: int | None = None, now: float | None = None) -> list[str]:
        """Delete the stored specs not used (loaded or saved) for ``days`` (default ``limits.spec_days``), and
        temporary files a crashed save left; return the ids deleted. Bundled specs are never stored here."""
        days = self.limits.spec_days if days is None else days
        now = time.time() if now is None else now
        cutoffs = {"spec": now - days * _DAY, "leftover": now - _DAY}
        pruned: list[str] = []
        if not self.root.is_dir():
            return pruned
        with self._locked(fcntl.LOCK_EX):
            for path in self.root.iterdir():
                if path.suffix == ".json" and _ID.match(path.stem):
                    kind = "spec"
                elif path.name.startswith(".") and path.name.endswith(".tmp"):
                    kind = "leftover"  # saves hold the shared lock: none is being written now
                else:
                    continue
                try:
                    if path.stat().st_mtime >= cutoffs[kind]:
                        continue
                    path.unlink()
                except OSError:
                    continue
                if kind == "spec":
                    pruned.append(path.stem)
            _touch(self.root / _PRUNED)
        return sorted(pruned)

    def _prune_daily(self) -> None:
        """``prune`` when the last one is more than a day old (so no cron job is needed for specs)."""
        try:
            last = (self.root / _PRUNED).stat().st_mtime
        except OSError:
            last = 0.0
        if time.time() - last > _DAY:
            self.prune()


def _mark_used(path: Path, modified: float | None = None) -> None:
    """Record a use in the file's mtime, at most once a day; a read-only store is used without the record."""
    try:
        if modified is None:
            modified = path.stat().st_mtime
        if time.time() - modified > _MARK_EVERY:
            os.utime(path)
    except OSError:
        pass


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.touch()
