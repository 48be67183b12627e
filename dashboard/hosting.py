"""Hosted mode: the deployment this server runs (``$XAI_DEPLOYMENT``), who is signed in, what they may do.

Without ``$XAI_DEPLOYMENT`` the dashboard is the local single-user tool: ``deployment()`` is None, every
role check passes and paths are shown as they are. With it, ``gate()`` (called by ``app.py`` before any
page runs) shows a signed-out visitor, or a person without a role, the sign-in page and nothing else.

Sign-in (README "Sign-in and roles"): ``[auth] mode = "oidc"`` uses Streamlit's own OpenID Connect
sign-in (``st.login`` with the ``[auth]`` section of Streamlit's secrets: redirect_uri, cookie_secret,
client_id, client_secret, server_metadata_url); the person is the ID token's ``email`` and their groups
its ``groups_claim``. ``mode = "proxy"`` trusts the e-mail an authenticating reverse proxy puts in the
``proxy_header`` request header: the server must then be reachable only through that proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import streamlit as st

from core.dataset import Dataset
from core.deployment import DEPLOYMENT_ENV, ROLES, Deployment, DeploymentError, Person, read_deployment
from dashboard.render import markdown_escape


class Viewed(Protocol):
    """What ``dataset_label`` reads of ``dashboard.state.View`` (which imports this module, not the reverse)."""

    @property
    def dataset(self) -> Dataset | None: ...
    @property
    def dataset_path(self) -> str: ...
    @property
    def dataset_id(self) -> str: ...


# An absolute path not already replaced by an id: a slash that does not follow a word, a dot, a colon or
# another slash (so "1/3", "and/or" and URLs stay), then anything up to white space or a quote.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])/[^\s'\"`<>|,;()\[\]{}]+")


@st.cache_resource(show_spinner=False, max_entries=2)
def _deployment(path: str, stamp: tuple[int, int, int]) -> Deployment:
    """Parsed once per server and file version (``stamp``: inode, size, mtime); errors are not cached."""
    return read_deployment(path)


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        status = os.stat(path)
    except OSError:
        return (0, 0, 0)  # read_deployment names the problem
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def deployment() -> Deployment | None:
    """The deployment ``$XAI_DEPLOYMENT`` names (re-read when the file changes), or None in local mode.

    A file that cannot be used stops the page with one line: the service is down until the admin fixes it.
    """
    path = os.environ.get(DEPLOYMENT_ENV)
    if not path:
        return None
    try:
        return _deployment(path, _stamp(path))
    except DeploymentError as error:
        # The admin wrote the path; a visitor still gets the variable's name rather than the server's folder.
        st.error(f"This service is not configured correctly: {str(error).replace(path, f'${DEPLOYMENT_ENV}')}")
        st.stop()
        raise  # st.stop() raises; this line only tells the type checker


def hosted() -> bool:
    return deployment() is not None


def _claim_groups(value: Any) -> frozenset[str]:
    """An ID token's groups claim: a list of names (or one name); anything else counts as no group."""
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        return frozenset(str(item) for item in value if isinstance(item, (str, int)))
    return frozenset()


def signed_in_person() -> Person | None:
    """The signed-in visitor as the deployment sees them (their role may be None), or None when nobody is
    signed in or in local mode."""
    current = deployment()
    if current is None:
        return None
    if current.auth == "proxy":
        email = st.context.headers.get(current.proxy_header)
        return current.person(email) if email and email.strip() else None
    user = st.user
    if not user.get("is_logged_in"):
        return None
    address = user.get("email")
    # A provider that says the address is unverified does not vouch for who this is.
    if not isinstance(address, str) or not address.strip() or user.get("email_verified") is False:
        return None
    return current.person(address, _claim_groups(user.get(current.groups_claim)))


def may(role: str) -> bool:
    """True when the visitor may act with ``role`` (always in local mode: the user owns the machine)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if deployment() is None:
        return True
    person = signed_in_person()
    return person is not None and person.may(role)


def require(role: str) -> None:
    """Stop the page with a message unless the visitor may act with ``role``."""
    if not may(role):
        st.warning(f"This needs the {role} role; ask the service's administrator if you need it.")
        st.stop()


def _auth_configured() -> bool:
    """Streamlit's secrets hold an ``[auth]`` section (st.login needs it)."""
    try:
        return "auth" in st.secrets
    except Exception:
        return False


def _sign_in_page(current: Deployment, person: Person | None) -> None:
    st.title("Face region explanations")
    if person is not None:  # signed in, but no role here
        st.error(
            f"No access: {markdown_escape(person.email)} has no role on this service. Ask its administrator for one."
        )
        if current.auth == "oidc":
            st.button("Sign out", on_click=st.logout)
        return
    if current.auth == "proxy":
        st.error("No access: the sign-in proxy did not say who you are. Open the service through its address.")
        return
    if not _auth_configured():
        st.error("Sign-in is not configured: Streamlit's secrets have no [auth] section (README 'Sign-in and roles').")
        return
    st.write("This service holds patients' photos and diagnoses. Sign in to continue.")
    st.button("Sign in", type="primary", on_click=st.login)


def gate() -> Person | None:
    """In hosted mode, show the sign-in page and stop unless a person with a role is signed in; else note who
    is signed in (with a sign-out button) in the sidebar. Returns that person; None in local mode."""
    current = deployment()
    if current is None:
        return None
    person = signed_in_person()
    if person is None or person.role is None:
        _sign_in_page(current, person)
        st.stop()
    assert person is not None  # st.stop() raised otherwise
    st.sidebar.caption(f"Signed in as {markdown_escape(person.email)} ({person.role})")
    if current.auth == "oidc":
        st.sidebar.button("Sign out", key="_sign_out", on_click=st.logout)
    return person


def dataset_label(view: Viewed) -> str:
    """How pages name the view's dataset: its title and id in hosted mode, its folder in local mode."""
    current = deployment()
    if current is not None and view.dataset_id:
        entry = current.dataset(view.dataset_id)
        return f"{entry.title} ({entry.id})" if entry.title != entry.id else entry.id
    if view.dataset is not None:
        return str(view.dataset.root)
    return view.dataset_path


@st.cache_resource(show_spinner=False, max_entries=2)
def _image_key(path: str) -> bytes:
    """The deployment's image-id key: read, or made once (32 random bytes, owner-only) and kept across restarts
    so that links stay valid."""
    key_file = Path(path)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # made earlier, or by another server process just now
    else:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    key = key_file.read_bytes()
    if len(key) != 32:
        raise DeploymentError("the image-id key in the state folder is damaged; delete it (old links stop working)")
    return key


def image_ids(names: list[str]) -> dict[str, str]:
    """Opaque id -> image name, in the names' order. Hosted mode: a keyed hash (HMAC-SHA256 under the
    deployment's own random key, 12 hex digits), so neither a link nor a page carries a patient's file name and
    an id cannot be turned back into a guessed name; stable across restarts. Local mode: the names themselves."""
    current = deployment()
    if current is None:
        return {name: name for name in names}
    key = _image_key(str(current.image_id_key))
    return {"img-" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:12]: name for name in names}


def image_label(name: str) -> str:
    """How pages name a dataset image: its opaque id in hosted mode, its file name in local mode."""
    return next(iter(image_ids([name])))


def shown_error(error: BaseException) -> str:
    """An error's text as a page shows it: server paths redacted (hosted mode), Markdown escaped."""
    return markdown_escape(redact(str(error)))


def with_image_ids(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with its ``image_name`` column as pages may show or hand out: opaque ids in hosted mode
    (``image_ids``), the names themselves in local mode. For tables and charts that reach the browser."""
    if deployment() is None or "image_name" not in table.columns:
        return table
    names = table["image_name"].unique(maintain_order=True).to_list()
    label = {name: identifier for identifier, name in image_ids(names).items()}
    return table.with_columns(pl.col("image_name").replace_strict(label, return_dtype=pl.String))


def _known_paths(current: Deployment) -> list[tuple[str, str]]:
    """The deployment's folders and files, each with what to show instead."""
    known: list[tuple[Path, str]] = [(current.state_dir, "the service's state folder")]
    for entry in current.datasets:
        known.append((entry.folder, f"dataset {entry.id}"))
        known.extend((card, f"model {entry.id}/{model}") for model, card in entry.models.items())
        if entry.parser is not None:
            known.append((entry.parser, f"the face parser of {entry.id}"))
    pairs: dict[str, str] = {}
    for path, label in known:  # a path as written wins over another entry's resolved spelling (symbolic links)
        pairs[str(path)] = label
    for path, label in known:
        pairs.setdefault(str(path.resolve()), label)
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))  # the longest (deepest) path first


def redact(text: str) -> str:
    """Error text fit for a hosted page: the deployment's folders become their ids, any other absolute path
    "…". Local mode: unchanged (the user owns the machine and needs the path)."""
    current = deployment()
    if current is None:
        return text
    for spelling, label in _known_paths(current):
        # A path below a known folder (a file inside a dataset) names only the folder.
        text = re.sub(re.escape(spelling) + r"(?:/[^\s'\"`<>|,;()\[\]{}]*)?", label.replace("\\", r"\\"), text)
    return _ABSOLUTE_PATH.sub("…", text)
