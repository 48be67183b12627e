"""Region specs kept on the server by their content id, so a short URL (``?spec=3fa2…``) names an edited spec.

A spec is written once under ``<id>.json`` (the id is ``core.regions.spec_id``, a hash of its
canonical JSON), so the same edit always lands in the same file and a link stays valid for as
long as the folder is kept. Writes go to a temporary file and are renamed into place, so two
sessions saving at once, or a crash halfway, never leave a torn file behind. Bundled specs
(``core/region_specs/*.json``) are addressable by their name as well.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
from core.errors import RegionSpecError, UserFacingError
from core.regions import RegionSpec, bundled_region_specs, spec_id

_ID = re.compile(r"^[0-9a-f]{12}$")


class UnknownSpecError(UserFacingError):
    """A spec reference names neither a bundled spec nor a stored one."""


def default_spec_dir() -> Path:
    """``specs/`` beside the result cache (``$XAI_CACHE_DIR/../specs``, else ``<repo>/.cache/specs``)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).parent / "specs"


class SpecStore:
    """Content-addressed JSON files, one per region spec."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_spec_dir()

    def save(self, spec: RegionSpec) -> str:
        """Store ``spec`` (idempotent) and return its id."""
        identifier = spec_id(spec)
        path = self.root / f"{identifier}.json"
        if path.is_file():
            return identifier
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=f".{identifier}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(spec.to_json())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return identifier

    def load(self, identifier: str) -> RegionSpec:
        """The stored spec with this id; a damaged or edited file is refused, since its id would lie."""
        if not _ID.match(identifier or ""):
            raise UnknownSpecError(f"{identifier!r} is not a region spec id (12 hex digits) nor a bundled spec name")
        path = self.root / f"{identifier}.json"
        if not path.is_file():
            raise UnknownSpecError(f"region spec {identifier} is not in the spec store ({self.root})")
        try:
            spec = RegionSpec.from_json(path.read_text(encoding="utf-8"))
        except (RegionSpecError, UnicodeDecodeError, OSError) as error:
            raise UnknownSpecError(f"region spec {identifier} in {self.root} cannot be read: {error}") from None
        if spec_id(spec) != identifier:
            raise UnknownSpecError(f"region spec file {path} was changed after it was stored (its content id differs)")
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
