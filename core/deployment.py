"""A hosted deployment: which datasets and models it serves by id, who may sign in with which role,
its limits, and the one owner of every path under its state folder (results, caches, specs, jobs).

``$XAI_DEPLOYMENT`` names the TOML file (``deploy/example.toml`` documents every key); without it
the dashboard is the local single-user tool. In hosted mode pages, links, errors and logs carry
ids only: the paths below never leave the server.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from core.errors import UserFacingError
from core.regions import NAME_CHARS, SPEC_BYTES, SPEC_REGIONS
from models.checkpoint import CARD_BYTES, WEIGHTS_BYTES

DEPLOYMENT_ENV = "XAI_DEPLOYMENT"
ROLES = ("viewer", "analyst")  # in order of what they may do; an analyst may do all a viewer may
AUTH_MODES = ("oidc", "proxy")
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_MAX_FILE_BYTES = 1 << 20


class DeploymentError(UserFacingError):
    """The deployment file is missing, unreadable or not as ``deploy/example.toml`` describes."""


@dataclass(frozen=True)
class Limits:
    """What one stranger may cost the service (every number has a default that suits a small clinic)."""

    jobs_running: int = 1  # extraction jobs running at once, server-wide
    jobs_per_user: int = 1  # a user's queued + running jobs
    job_threads: int = 2  # torch threads of one job's process (it also runs at a lower CPU priority)
    spec_bytes: int = SPEC_BYTES  # a region spec's JSON (core.regions.SpecCaps)
    spec_regions: int = SPEC_REGIONS
    name_chars: int = NAME_CHARS  # a spec's or a region's name
    spec_days: int = 90  # a stored spec (and its mask files) unused this long is pruned
    upload_cache_days: int = 7  # opted-in cached uploads expire
    result_versions: int = 3  # finished result versions kept per dataset × split (the current one included)
    card_bytes: int = CARD_BYTES  # a model card (JSON) read from disk
    weights_bytes: int = WEIGHTS_BYTES  # a model's weights file read from disk
    display_pixels: int = 1024  # longest side of a photo sent to the browser


@dataclass(frozen=True)
class DatasetEntry:
    """One served dataset: its folder (read-only is fine), its fold models and parser, who may see it."""

    id: str
    title: str
    folder: Path
    models: Mapping[str, Path]  # model id -> classifier card
    parser: Path | None = None
    roles: frozenset[str] = frozenset(ROLES)  # roles that see it ...
    groups: frozenset[str] = frozenset()  # ... or members of these identity-provider groups


@dataclass(frozen=True)
class Person:
    """A signed-in visitor as the deployment sees them: no role means they may not use the service."""

    email: str
    role: str | None
    groups: frozenset[str] = frozenset()

    def may(self, role: str) -> bool:
        """True when this person's role includes ``role`` (an analyst may do what a viewer may)."""
        return self.role is not None and ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class Deployment:
    datasets: tuple[DatasetEntry, ...]
    state_dir: Path
    users: Mapping[str, str] = field(default_factory=dict)  # e-mail (lower case) -> role
    groups: Mapping[str, str] = field(default_factory=dict)  # group -> role
    auth: str = "oidc"
    proxy_header: str = "X-Forwarded-Email"  # auth = "proxy": the header the proxy sets
    groups_claim: str = "groups"  # auth = "oidc": the ID token claim listing a person's groups
    allowed_hosts: tuple[str, ...] = ()
    limits: Limits = Limits()

    # Who may do what.
    def person(self, email: str, groups: frozenset[str] = frozenset()) -> Person:
        """The person behind a signed-in e-mail: the higher of their own role and their groups' roles."""
        email = email.strip().lower()
        granted = [self.users.get(email), *(self.groups.get(group) for group in groups)]
        roles = [role for role in granted if role is not None]
        return Person(email, max(roles, key=ROLES.index) if roles else None, groups)

    def visible(self, person: Person) -> tuple[DatasetEntry, ...]:
        """The datasets this person may open, in the file's order."""
        if person.role is None:
            return ()
        return tuple(
            entry
            for entry in self.datasets
            if any(person.may(role) for role in entry.roles) or entry.groups & person.groups
        )

    def dataset(self, dataset_id: str) -> DatasetEntry:
        for entry in self.datasets:
            if entry.id == dataset_id:
                return entry
        raise DeploymentError(f"no dataset {dataset_id!r} in this deployment")

    # The one owner of every path under the state folder.
    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache" / "results"

    @property
    def spec_dir(self) -> Path:
        return self.state_dir / "cache" / "specs"

    @property
    def upload_cache_dir(self) -> Path:
        return self.state_dir / "cache" / "uploads"

    def results(self, dataset_id: str) -> Path:
        """Where jobs write the results of one dataset (never inside the dataset's own, read-only folder)."""
        return self.state_dir / "results" / self.dataset(dataset_id).id

    @property
    def jobs_db(self) -> Path:
        return self.state_dir / "jobs" / "queue.sqlite"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "jobs" / "audit.jsonl"

    @property
    def image_id_key(self) -> Path:
        """A random key, made on first use, that turns image names into opaque ids for links and pages."""
        return self.state_dir / "keys" / "image-ids.key"


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise DeploymentError(f"{what} must be a short id (a-z, 0-9, - and _, at most 32), not {value!r}")
    return value


def _role(value: Any, what: str) -> str:
    if value not in ROLES:
        raise DeploymentError(f"{what} must be one of {', '.join(ROLES)}, not {value!r}")
    return str(value)


def _table(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, Mapping):
        raise DeploymentError(f"[{key}] must be a table")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DeploymentError(f"{what} must be a list of strings")
    return tuple(value)


def _path(value: Any, base: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DeploymentError(f"{what} must be a path")
    return (base / value).resolve() if not os.path.isabs(value) else Path(value)


def _limits(table: Mapping[str, Any]) -> Limits:
    defaults = Limits()
    known = set(Limits.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise DeploymentError(f"unknown [limits] key(s): {', '.join(sorted(unknown))}")
    values = {}
    for key, value in table.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DeploymentError(f"[limits] {key} must be a whole number ≥ 1, not {value!r}")
        values[key] = value
    return Limits(**{**{k: getattr(defaults, k) for k in known}, **values})


def _dataset(dataset_id: str, table: Any, base: Path) -> DatasetEntry:
    what = f"[datasets.{dataset_id}]"
    if not isinstance(table, Mapping):
        raise DeploymentError(f"{what} must be a table")
    models = table.get("models", {})
    if not isinstance(models, Mapping):
        raise DeploymentError(f"{what} models must be a table of model id = card path")
    roles = _strings(table.get("roles", list(ROLES)), f"{what} roles")
    return DatasetEntry(
        id=dataset_id,
        title=str(table.get("title") or dataset_id),
        folder=_path(table.get("folder"), base, f"{what} folder"),
        models=MappingProxyType(
            {
                _id(model, f"{what} model id"): _path(card, base, f"{what} model {model}")
                for model, card in models.items()
            }
        ),
        parser=_path(table["parser"], base, f"{what} parser") if "parser" in table else None,
        roles=frozenset(_role(role, f"{what} roles") for role in roles),
        groups=frozenset(_strings(table.get("groups", []), f"{what} groups")),
    )


def parse_deployment(text: str, base: Path) -> Deployment:
    """The deployment a TOML text describes; relative paths are taken from ``base`` (the file's folder)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DeploymentError(f"the deployment file is not valid TOML: {error}") from None
    server, auth = _table(document, "server"), _table(document, "auth")
    datasets = _table(document, "datasets")
    if not datasets:
        raise DeploymentError("the deployment serves no dataset: add a [datasets.<id>] table")
    mode = auth.get("mode", "oidc")
    if mode not in AUTH_MODES:
        raise DeploymentError(f"[auth] mode must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    users = _table(document, "users")
    groups = _table(document, "groups")
    return Deployment(
        datasets=tuple(_dataset(_id(key, "a dataset id"), value, base) for key, value in datasets.items()),
        state_dir=_path(server.get("state_dir"), base, "[server] state_dir"),
        users=MappingProxyType({str(email).lower(): _role(role, f"[users] {email}") for email, role in users.items()}),
        groups=MappingProxyType({str(group): _role(role, f"[groups] {group}") for group, role in groups.items()}),
        auth=mode,
        proxy_header=str(auth.get("proxy_header", "X-Forwarded-Email")),
        groups_claim=str(auth.get("groups_claim", "groups")),
        allowed_hosts=_strings(server.get("allowed_hosts", []), "[server] allowed_hosts"),
        limits=_limits(_table(document, "limits")),
    )


def read_deployment(path: str | Path) -> Deployment:
    """Read the deployment file (a regular file of at most 1 MB)."""
    path = Path(path)
    try:
        status = path.stat()
    except OSError:
        raise DeploymentError(f"the deployment file {path} cannot be read") from None
    if not stat.S_ISREG(status.st_mode) or status.st_size > _MAX_FILE_BYTES:
        raise DeploymentError(f"the deployment file {path} must be a regular file of at most 1 MB")
    return parse_deployment(path.read_text(encoding="utf-8"), path.parent)


def deployment_from_environment() -> Deployment | None:
    """The deployment ``$XAI_DEPLOYMENT`` names, or None in local mode."""
    path = os.environ.get(DEPLOYMENT_ENV)
    return read_deployment(path) if path else None
