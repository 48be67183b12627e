"""Issue 13, bounded user content, through AppTest: names from a shared spec link are rendered as text on
every page that shows them, and the Regions page's edits and imports keep to the spec caps."""

import json

from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from cache.spec_store import SpecStore
from core.deployment import DEPLOYMENT_ENV
from core.regions import BoxRule, RegionRule, RegionSpec
from dashboard.render import markdown_escape
from tests.dashboard.conftest import APP, no_trouble, open_app

REGIONS = "views/regions.py"
EVIL = "[Session expired – sign in again](https://evil.example)"
IMAGE = "![x](https://evil.example/a.png) :material/lock:"
INJECTED = RegionSpec(
    (RegionRule(EVIL, labels=(1,)), RegionRule(IMAGE, boxes=(BoxRule((6,)),))),
    name=EVIL,
)
AUTH = {  # Streamlit's [auth] secrets; AppTest's user stands in for a signed-in person
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "not-a-secret-only-a-test",
    "client_id": "dashboard",
    "client_secret": "test",
    "server_metadata_url": "http://localhost:1/.well-known/openid-configuration",
}
# Proto fields Streamlit renders as Markdown: element bodies, widget labels and help, image captions.
_MARKDOWN_FIELDS = {"body", "label", "help", "caption"}


def _markdown_texts(message) -> list[str]:
    """Every Markdown-rendered string of one element's proto, nested messages included."""
    found = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if field.type == field.TYPE_MESSAGE:
                found += _markdown_texts(item)
            elif field.type == field.TYPE_STRING and field.name in _MARKDOWN_FIELDS:
                found.append(item)
    return found


def _all_markdown(app) -> list[str]:
    texts: list[str] = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None and not hasattr(node, "children"):
            texts.extend(_markdown_texts(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(app._tree)
    return texts


def _assert_no_injection(texts: list[str]) -> None:
    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    for text in texts:
        assert "https://evil.example" not in text, text  # neither a link nor a bare (autolinked) URL
        assert ":material/lock" not in text  # the page's own icons stay
        assert "<a " not in parser.render(text) and "<img" not in parser.render(text)


def test_names_from_a_shared_spec_link_render_as_text_on_every_page(on_tiny):
    identifier = SpecStore().save(INJECTED)
    app = open_app({"spec": identifier, "methods": "Gradient", "source": "dataset image"})
    no_trouble(app)
    explain = _all_markdown(app)
    _assert_no_injection(explain)
    escaped = markdown_escape(EVIL)
    # Not vacuous: the names are on the page, escaped: the region legend, the reading, the sidebar's caption.
    assert any(escaped in text and text.startswith("**Regions**") for text in explain)
    winners = (escaped, markdown_escape(IMAGE))  # the one-sentence reading names the region most methods chose
    assert any(i.value.startswith("Predicted ") and any(w in i.value for w in winners) for i in app.info)
    assert any(escaped in c.value for c in app.sidebar.caption)
    app.switch_page(REGIONS).run()
    no_trouble(app)
    regions = _all_markdown(app)
    _assert_no_injection(regions)
    assert any(text == f"**1. {escaped}** · pixels of labels" for text in regions)
    assert any(markdown_escape(IMAGE) in text for text in regions)  # its title and the gap-split labels


def test_the_regions_page_keeps_imports_and_names_to_the_caps(on_tiny):
    app = open_app({"methods": "Gradient"}, page=REGIONS)
    name = next(w for w in app.text_input if w.label == "Spec name")
    assert name.proto.max_chars == 64  # the browser's bound; Streamlit cuts a longer value on the server too
    many = {"name": "many", "regions": [{"name": f"r{i}", "labels": [1]} for i in range(33)]}
    app.file_uploader(key="spec_upload").upload("many.json", json.dumps(many).encode(), "application/json").run()
    assert not app.exception
    refused = markdown_escape("Not imported: region spec has 33 regions; this server takes at most 32")  # shown escaped
    assert any(e.value == refused for e in app.error)
    huge = b'{"name": "' + b"x" * (1 << 20) + b'", "regions": []}'
    app.file_uploader(key="spec_upload").clear().upload("huge.json", huge, "application/json").run()
    assert any(e.value.startswith(markdown_escape("Not imported: region spec is 1024 KB of JSON")) for e in app.error)
    assert app.sidebar.selectbox(key="spec").value == "paper"


def test_a_deployments_limits_bound_the_editor_and_its_titles_are_text(tiny_dataset, tmp_path, monkeypatch):
    """Hosted mode: the deployment's [limits] (3 regions, names of 8 characters) refuse an added region and
    bound the name field; a dataset title with a link in it is shown as text."""
    deployment = tmp_path / "deployment.toml"
    deployment.write_text(
        f"""
[server]
state_dir = "{tmp_path / "state"}"
[users]
"analyst@example.org" = "analyst"
[limits]
spec_regions = 3
name_chars = 8
[datasets.clinic]
title = "{EVIL}"
folder = "{tiny_dataset}"
models = {{ f1 = "{tiny_dataset / "models" / "classifier-fold-1.json"}" }}
""",
        encoding="utf-8",
    )
    monkeypatch.setenv(DEPLOYMENT_ENV, str(deployment))
    app = AppTest.from_file(APP, default_timeout=180)
    app.user = {"is_logged_in": True, "email": "analyst@example.org"}
    app.secrets["auth"] = AUTH
    app.query_params.update({"methods": "Gradient"})
    app.run()
    app.switch_page(REGIONS).run()
    no_trouble(app)
    _assert_no_injection(_all_markdown(app))
    assert markdown_escape(EVIL) in [c.value for c in app.sidebar.caption]
    assert next(w for w in app.text_input if w.label == "Spec name").proto.max_chars == 8
    template = next(w for w in app.selectbox if w.key and "template" in w.key)
    template.set_value(template.options[0])
    next(b for b in app.button if b.key and "add-region" in b.key).click().run()
    assert not app.exception
    refused = markdown_escape("Not applied: region spec has 4 regions; this server takes at most 3")
    assert any(e.value == refused for e in app.error)
    assert app.sidebar.selectbox(key="spec").value == "paper"


def test_a_spec_link_of_any_length_gets_one_short_line(on_tiny):
    app = open_app({"spec": "[x](https://evil.example)" + "y" * 100_000, "methods": "Gradient"})
    assert not app.exception
    (warning,) = app.sidebar.warning
    assert len(warning.value) < 300 and "is not a region spec id" in warning.value, warning.value
    _assert_no_injection(_all_markdown(app))
