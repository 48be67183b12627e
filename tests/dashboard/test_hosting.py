"""Hosted mode in AppTest: the sign-in gate, roles, datasets by id per person, and paths kept off the page."""

import hashlib
import hmac
import shutil
from pathlib import Path

import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from core.deployment import DEPLOYMENT_ENV
from dashboard import hosting
from tests.dashboard.conftest import APP, plain

AUTH = {
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "not-a-secret-only-a-test",
    "client_id": "dashboard",
    "client_secret": "test",
    "server_metadata_url": "http://localhost:1/.well-known/openid-configuration",
}
SIGNED_OUT = {"is_logged_in": False}


def _user(email: str, **claims) -> dict:
    return {"is_logged_in": True, "email": email, **claims}


@pytest.fixture
def hosted(tiny_dataset, tmp_path, monkeypatch) -> Path:
    """Two datasets: `clinic` for every role, `research` for analysts and the `genetics` group only."""
    folder = tmp_path / "served"
    shutil.copytree(tiny_dataset, folder / "clinic")
    (folder / "research").symlink_to(folder / "clinic")
    deployment = tmp_path / "deployment.toml"
    deployment.write_text(
        f"""
[server]
state_dir = "{tmp_path / "state"}"

[auth]
mode = "oidc"

[users]
"viewer@example.org" = "viewer"
"analyst@example.org" = "analyst"

[groups]
genetics = "viewer"

[datasets.clinic]
title = "Clinic photos"
folder = "{folder / "clinic"}"
models = {{ f1 = "{folder / "clinic" / "models" / "classifier-fold-1.json"}" }}

[datasets.research]
folder = "{folder / "research"}"
models = {{ f2 = "{folder / "research" / "models" / "classifier-fold-2.json"}" }}
roles = ["analyst"]
groups = ["genetics"]
""",
        encoding="utf-8",
    )
    monkeypatch.setenv(DEPLOYMENT_ENV, str(deployment))
    return folder


def open_hosted(user: dict, query: dict | None = None, auth: bool = True) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=180)
    app.user = user
    if auth:
        app.secrets["auth"] = AUTH
    app.query_params.update({"methods": "Gradient", **(query or {})})
    app.run()
    return app


def _text(app: AppTest) -> str:
    parts = [  # as a reader sees it: a path escaped for Markdown must still be found
        plain(element.value)
        for kind in ("markdown", "caption", "error", "warning", "info", "title")
        for element in getattr(app, kind)
    ]
    parts += [str(element.value) for element in app.sidebar.selectbox]
    return "\n".join(map(str, parts))


def test_a_signed_out_visitor_sees_the_sign_in_page_and_nothing_else(hosted):
    app = open_hosted(SIGNED_OUT, {"dataset": "clinic"})
    assert not app.exception
    assert [button.label for button in app.button] == ["Sign in"]
    assert not app.sidebar.selectbox and not app.sidebar.text_input and not app.sidebar.code
    text = _text(app)
    assert "clinic" not in text.lower() and "research" not in text and str(hosted) not in text


def test_without_auth_secrets_the_sign_in_page_says_so(hosted):
    app = open_hosted(SIGNED_OUT, auth=False)
    assert "Sign-in is not configured" in app.error[0].value and not app.button


def test_a_person_without_a_role_sees_no_access(hosted):
    app = open_hosted(_user("stranger@example.org"))
    assert "No access" in app.error[0].value
    assert [button.label for button in app.button] == ["Sign out"]
    assert not app.sidebar.selectbox


def test_an_unverified_email_is_not_signed_in(hosted):
    app = open_hosted(_user("viewer@example.org", email_verified=False))
    assert [button.label for button in app.button] == ["Sign in"]


def test_a_viewer_sees_only_their_datasets_by_id_and_no_path_box(hosted):
    app = open_hosted(_user("Viewer@Example.org"))
    assert not app.exception
    dataset = app.sidebar.selectbox(key="dataset")
    assert dataset.options == ["clinic"] and dataset.value == "clinic"
    assert app.sidebar.selectbox(key="model").options == ["f1"]
    assert not app.sidebar.text_input  # no dataset, card or parser path
    assert "Signed in as viewer@example.org (viewer)" in [plain(caption.value) for caption in app.sidebar.caption]
    assert str(hosted) not in _text(app)
    link = app.sidebar.code[0].value
    assert "dataset=clinic" in link and "model=f1" in link and "card=" not in link and "parser=" not in link


def test_a_group_or_the_analyst_role_opens_the_restricted_dataset(hosted):
    in_group = open_hosted(_user("someone@example.org", groups=["genetics"]))
    assert in_group.sidebar.selectbox(key="dataset").options == ["clinic", "research"]
    analyst = open_hosted(_user("analyst@example.org"), {"dataset": "research"})
    assert analyst.sidebar.selectbox(key="dataset").value == "research"
    assert analyst.sidebar.selectbox(key="model").options == ["f2"]


def test_a_hidden_id_reads_exactly_like_an_unknown_one_and_paths_in_the_url_are_ignored(hosted):
    hidden = open_hosted(_user("viewer@example.org"), {"dataset": "research"})
    unknown = open_hosted(_user("viewer@example.org"), {"dataset": "nowhere"})
    path = open_hosted(_user("viewer@example.org"), {"dataset": "/etc", "card": "/etc/passwd", "parser": "/dev/zero"})
    messages = [[warning.value for warning in app.sidebar.warning] for app in (hidden, unknown, path)]
    assert messages[0] == messages[1] == messages[2] and len(messages[0]) == 1
    assert "research" not in messages[0][0] and "nowhere" not in messages[0][0]
    for app in (hidden, unknown, path):
        assert app.sidebar.selectbox(key="dataset").value == "clinic"
        assert "/etc" not in app.sidebar.code[0].value


def test_error_text_names_the_deployment_folders_by_id_and_hides_every_other_path(hosted, tmp_path):
    card = hosted / "clinic" / "models" / "classifier-fold-1.json"
    photo = hosted / "clinic" / "images" / "patient-0001.jpg"
    text = (
        f"cannot read {card}: bad JSON; {photo} is not an image; {tmp_path / 'state' / 'cache'} is full; "
        f"no folder /srv/secret/other; weights 1/3 and/or see https://example.org/a/b; relative data/demo"
    )
    assert hosting.redact(text) == (
        "cannot read model clinic/f1: bad JSON; dataset clinic is not an image; the service's state folder is full; "
        "no folder …; weights 1/3 and/or see https://example.org/a/b; relative data/demo"
    )


def test_local_mode_shows_paths_as_they_are(monkeypatch):
    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)
    assert hosting.redact("no folder /srv/data") == "no folder /srv/data"
    assert hosting.deployment() is None and hosting.may("analyst")


def test_a_broken_deployment_file_is_one_line_without_its_path(tmp_path, monkeypatch):
    broken = tmp_path / "deployment.toml"
    broken.write_text("[datasets.Bad-Id]\nfolder = 'x'\n", encoding="utf-8")
    monkeypatch.setenv(DEPLOYMENT_ENV, str(broken))
    app = AppTest.from_file(APP, default_timeout=60)
    app.run()
    assert len(app.error) == 1 and "a dataset id must be a short id" in app.error[0].value
    assert str(tmp_path) not in app.error[0].value and not app.sidebar.selectbox
    monkeypatch.setenv(DEPLOYMENT_ENV, str(tmp_path / "missing.toml"))
    app.run()
    assert app.error[0].value.endswith(f"the deployment file ${DEPLOYMENT_ENV} cannot be read")


def test_only_an_analyst_edits_or_imports_specs_on_the_regions_page(hosted):
    viewer = open_hosted(_user("viewer@example.org"))
    viewer.switch_page("views/regions.py").run()
    assert not viewer.exception
    assert "needs the analyst role" in " ".join(caption.value for caption in viewer.caption)
    assert not viewer.get("file_uploader") and not viewer.text_input  # no import, no region name fields
    analyst = open_hosted(_user("analyst@example.org"))
    analyst.switch_page("views/regions.py").run()
    assert not analyst.exception
    assert analyst.get("file_uploader") and analyst.text_input


def test_pages_name_the_dataset_by_title_and_id_and_only_an_analyst_gets_extract(hosted):
    viewer = open_hosted(_user("viewer@example.org"))
    viewer.switch_page("views/statistics.py").run()
    assert not viewer.exception
    assert any("of Clinic photos (clinic) yet" in plain(info.value) for info in viewer.info)
    assert "needs the analyst role" in " ".join(caption.value for caption in viewer.caption)
    assert not [button for button in viewer.button if button.label.startswith("Extract")]
    assert str(hosted) not in _text(viewer)
    analyst = open_hosted(_user("analyst@example.org"))
    analyst.switch_page("views/statistics.py").run()
    assert [button.label for button in analyst.button if button.label.startswith("Extract")] == [
        "Extract region scores of split 'val'"
    ]


def test_images_travel_by_opaque_ids_that_stay_stable_and_name_no_file(hosted, tmp_path):
    names = sorted(path.name for path in (hosted / "clinic" / "images").rglob("*") if path.is_file())
    app = open_hosted(_user("viewer@example.org"), {"source": "dataset image", "split": "val"})
    assert not app.exception
    face = app.selectbox(key="image")
    assert face.options and all(option.startswith("img-") and len(option) == 16 for option in face.options)
    assert len(set(face.options)) == len(face.options)
    # The key is made once, owner-only, and the same image gets the same id in a new session (links keep working).
    key = tmp_path / "state" / "keys" / "image-ids.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    chosen = face.options[1]
    again = open_hosted(_user("viewer@example.org"), {"source": "dataset image", "split": "val", "image": chosen})
    assert again.selectbox(key="image").value == chosen and f"image={chosen}" in again.sidebar.code[0].value
    page = _text(again) + again.sidebar.code[0].value
    assert not [name for name in names if name in page or Path(name).stem in page]
    # An id made under another key (a deleted key file) falls back to the first face.
    stale = open_hosted(_user("viewer@example.org"), {"source": "dataset image", "split": "val", "image": "img-0"})
    assert not stale.exception and stale.selectbox(key="image").value == face.options[0]


def test_tables_and_charts_that_reach_the_browser_carry_image_ids_not_file_names(hosted, tmp_path, monkeypatch):
    table = pl.DataFrame(
        {"image_name": ["patient-0001.jpg", "patient-0002.jpg", "patient-0001.jpg"], "score": [1, 2, 3]}
    )
    shown = hosting.with_image_ids(table)
    key = (tmp_path / "state" / "keys" / "image-ids.key").read_bytes()  # made by the call above
    expected = ["img-" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:12] for name in table["image_name"]]
    assert shown["image_name"].to_list() == expected and shown["score"].to_list() == [1, 2, 3]
    monkeypatch.delenv(DEPLOYMENT_ENV)
    assert hosting.with_image_ids(table).equals(table)
