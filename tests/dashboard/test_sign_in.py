"""A real sign-in in a real browser: ``./run.sh host`` with Streamlit's OIDC sign-in against an OpenID provider
(``oidc-provider-mock``, started here in-process), Chromium going through the provider's redirect flow.

A signed-out visitor sees the sign-in page only; a viewer sees the Explain page and the tables but no Extract
button; an analyst sees the Extract button; a person the deployment gives no role sees "No access".
Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``); skipped without it.
"""

import os
import shutil

import pytest

from dashboard.screenshots import CHROMIUM, REPO, browser, free_port, serve, settled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]
DATASET_ID, TITLE = "clinic", "Clinic photos"
VIEWER, ANALYST, STRANGER = "viewer@clinic.example", "analyst@clinic.example", "stranger@elsewhere.example"
EXTRACT = "Extract region scores of split"


@pytest.fixture(scope="module")
def provider():
    """The OpenID provider: each predefined user is one button on its authorization form (subject = e-mail)."""
    from oidc_provider_mock import User, run_server_in_thread

    previous = os.environ.get("AUTHLIB_INSECURE_TRANSPORT")
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # the provider on plain http://localhost
    users = [User(sub=email, claims={"email": email, "email_verified": True}) for email in (VIEWER, ANALYST, STRANGER)]
    try:
        with run_server_in_thread(user_claims=users) as server:
            yield f"http://localhost:{server.server_port}"
    finally:
        if previous is None:
            os.environ.pop("AUTHLIB_INSECURE_TRANSPORT", None)
        else:
            os.environ["AUTHLIB_INSECURE_TRANSPORT"] = previous


@pytest.fixture(scope="module")
def hosted(tiny_dataset, provider, tmp_path_factory):
    """``./run.sh host`` serving a copy of the tiny dataset as ``clinic``, its [auth] secrets in a file of its own."""
    folder = tmp_path_factory.mktemp("sign-in")
    dataset = folder / "datasets" / "tiny-faces"
    shutil.copytree(tiny_dataset, dataset)
    cards = sorted((dataset / "models").glob("classifier-fold-*.json"))
    port = free_port()
    deployment = folder / "deployment.toml"
    deployment.write_text(
        "\n".join(
            [
                "[server]",
                f'state_dir = "{folder / "state"}"',
                'allowed_hosts = ["127.0.0.1"]',
                "[auth]",
                'mode = "oidc"',
                "[users]",
                f'"{VIEWER}" = "viewer"',
                f'"{ANALYST}" = "analyst"',
                f"[datasets.{DATASET_ID}]",
                f'title = "{TITLE}"',
                f'folder = "{dataset}"',
                f"[datasets.{DATASET_ID}.models]",
                *(f'{card.stem.removeprefix("classifier-")} = "{card}"' for card in cards),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    secrets = folder / "secrets.toml"
    secrets.write_text(
        "\n".join(
            [
                "[auth]",
                f'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"',
                'cookie_secret = "a-test-cookie-secret-of-enough-length"',
                'client_id = "face-dashboard"',
                'client_secret = "test-client-secret"',
                f'server_metadata_url = "{provider}/.well-known/openid-configuration"',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    env = {
        "XAI_CACHE_DIR": str(folder / "local-cache"),
        "XAI_DATA_DIR": str(folder / "local-data"),
        "XAI_DATASET": "",
        "XAI_DEVICE": "cpu",
    }
    command = [str(REPO / "run.sh"), "host", str(deployment), "--secrets.files", str(secrets)]
    with serve(env, timeout=180, command=command, port=port) as base:
        yield base, dataset


def _sign_in(page, base: str, email: str) -> None:
    """From the sign-in page through the provider's form (choose ``email``) back to the dashboard."""
    page.goto(f"{base}/")
    settled(page)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/oauth2/authorize**", timeout=60_000)
    page.get_by_role("button", name=email, exact=True).click()
    page.wait_for_url(f"{base}/**", timeout=60_000)
    settled(page)


def _sidebar_text(page) -> str:
    sidebar = page.locator('[data-testid="stSidebar"]')
    return sidebar.inner_text() if sidebar.count() else ""


def test_a_signed_out_visitor_sees_only_the_sign_in_page(hosted, tmp_path):
    base, dataset = hosted
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        for path in ("", "statistics", f"regions?dataset={DATASET_ID}"):
            page.goto(f"{base}/{path}")
            settled(page)
            assert page.get_by_role("button", name="Sign in").is_visible(), path
            body = page.inner_text("body")
            assert TITLE not in body and DATASET_ID not in body and dataset.name not in body, path
            assert _sidebar_text(page) == "", path
            assert not page.locator("h1").filter(has_text="Explain a face").count(), path


def test_a_viewer_signs_in_sees_the_explain_page_and_no_extract_button(hosted, tmp_path):
    base, dataset = hosted
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        _sign_in(page, base, VIEWER)
        assert page.locator("h1").filter(has_text="Explain a face").is_visible()
        sidebar = _sidebar_text(page)
        assert f"Signed in as {VIEWER} (viewer)" in sidebar and DATASET_ID in sidebar
        assert str(dataset) not in page.inner_text("body")
        page.goto(f"{base}/statistics")
        settled(page)
        assert page.locator("h1").filter(has_text="Statistics").is_visible()
        assert page.get_by_text("needs the analyst role").is_visible()
        assert page.get_by_role("button", name=EXTRACT).count() == 0
        # Signing out ends the provider's session too (its confirmation form), then shows the sign-in page.
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/oauth2/end_session**", timeout=60_000)
        page.get_by_role("button", name="End session").click()
        page.wait_for_url(f"{base}/**", timeout=60_000)
        settled(page)
        assert page.get_by_role("button", name="Sign in").is_visible() and _sidebar_text(page) == ""


def test_an_analyst_sees_the_extract_button(hosted, tmp_path):
    base, _ = hosted
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        _sign_in(page, base, ANALYST)
        assert f"Signed in as {ANALYST} (analyst)" in _sidebar_text(page)
        page.goto(f"{base}/statistics")
        settled(page)
        assert page.get_by_role("button", name=EXTRACT).first.is_visible()


def test_a_person_without_a_role_sees_no_access(hosted, tmp_path):
    base, _ = hosted
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        _sign_in(page, base, STRANGER)
        assert page.get_by_text("No access").is_visible()
        body = page.inner_text("body")
        assert TITLE not in body and DATASET_ID not in body and _sidebar_text(page) == ""
