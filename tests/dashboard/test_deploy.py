"""The deployment recipe (deploy/): the image and compose file keep their promises, and the image's entrypoint
(``./run.sh host FILE``) serves a hosted dashboard that answers its health check and refuses a foreign Host.

No container engine runs in CI, so the container itself is not started here: the files are parsed for the
invariants a reviewer would check by hand, and the entrypoint command runs as a plain subprocess with the
project's virtual environment (what the image's venv holds), on the tiny dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.deployment import parse_deployment
from dashboard.screenshots import REPO, free_port

DEPLOY = REPO / "deploy"


def instructions(containerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile: comments dropped, continuation lines joined."""
    logical, pending = [], ""
    for line in containerfile.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return instructions(DEPLOY / "Containerfile")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> 'source:target[:options]' of a service's short-syntax volumes."""
    return {entry.split(":")[1]: entry for entry in service.get("volumes", [])}


def test_the_image_runs_as_a_fixed_non_root_user_from_python_3_11(image):
    users = [args for op, args in image if op == "USER"]
    assert users, "no USER: the app would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"} and int(user) >= 1000
    base = next(args for op, args in image if op == "ARG" and args.startswith("BASE="))
    assert re.search(r"python:3\.11-slim", base), base
    # USER comes after every RUN: nothing at run time is done as root.
    order = [op for op, _ in image]
    assert max(i for i, op in enumerate(order) if op == "RUN") < order.index("USER")


def test_the_entrypoint_is_run_sh_host_and_the_health_check_asks_streamlit(image):
    entrypoint = json.loads(next(args for op, args in image if op == "ENTRYPOINT"))
    assert entrypoint[-3:] == ["./run.sh", "host", "/config/deploy.toml"]
    assert next(args for op, args in image if op == "WORKDIR") == "/app"
    check = next(args for op, args in image if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8501/_stcore/health" in check and "b'ok'" in check


def test_the_venv_is_built_at_image_build_time_so_run_sh_installs_nothing(image):
    """The image writes the marker run.sh's setup compares with requirements.txt's sha256."""
    runs = " ".join(args for op, args in image if op == "RUN")
    assert "python3 -m venv /app/.venv" in runs and "-r /app/requirements.txt" in runs
    marker = re.search(r"sha256sum /app/requirements\.txt \| cut -d' ' -f1 > /app/\.venv/\.requirements\.sha256", runs)
    assert marker, "the image must record the requirements' hash where run.sh looks"
    run_sh = (REPO / "run.sh").read_text(encoding="utf-8")
    assert """want="$(sha256sum requirements.txt | cut -d' ' -f1)\"""" in run_sh
    assert 'cat "$VENV/.requirements.sha256"' in run_sh and 'VENV="${VENV:-.venv}"' in run_sh
    # The same command over the same file gives the same hex digest (what the image stored, run.sh computes).
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "requirements.txt"
        copy.write_bytes((REPO / "requirements.txt").read_bytes())
        shell = subprocess.run(
            ["bash", "-c", f"sha256sum {copy} | cut -d' ' -f1"], capture_output=True, text=True, check=True
        )
    assert shell.stdout.strip() == hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()


def test_nothing_secret_is_baked_into_the_image(image):
    copied = [args for op, args in image if op in {"COPY", "ADD"}]
    sources = [part for args in copied for part in args.split()[:-1] if not part.startswith("--")]
    assert not [s for s in sources if ("config" in s and s != ".streamlit/config.toml") or "secret" in s], sources
    for op, args in image:
        if op in {"ENV", "ARG"}:
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|CLIENT_ID|COOKIE)", args, re.IGNORECASE), args
    # The build context sends only what the image copies: deny everything, then allow code and settings.
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert not [a for a in allowed if "secret" in a or a.startswith(("deploy", "data", ".venv", ".cache"))]
    assert set(allowed) >= {"requirements.txt", "run.sh", ".streamlit/config.toml"}


def test_the_app_is_reachable_only_through_the_proxy_with_read_only_datasets(compose):
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    for name in ("app", "worker"):
        service, mounts = services[name], _mounts(services[name])
        assert mounts["/datasets"].endswith(":ro"), name
        assert mounts["/config"].endswith(":ro"), name
        assert mounts["/state"].split(":")[0] == "xai-state", name
        assert service["read_only"] is True and "ALL" in service["cap_drop"], name
    assert services["app"]["build"]["dockerfile"] == "deploy/Containerfile"
    assert services["app"]["command"] == ["--secrets.files", "/config/secrets.toml"]


def test_the_worker_is_its_own_service_running_the_queue_worker(compose):
    worker = compose["services"]["worker"]
    assert worker["entrypoint"][-5:] == ["-m", "core", "worker", "--deployment", "/config/deploy.toml"]
    assert worker["healthcheck"] == {"disable": True}
    assert "ports" not in worker and worker["networks"] == ["worker-only"]
    assert compose["networks"]["worker-only"] == {"internal": True}  # no route out, no other service on it
    assert not [
        name
        for name, service in compose["services"].items()
        if "worker-only" in service.get("networks", []) and name != "worker"
    ]


def _caddy_site(path: Path) -> str:
    return "\n".join(line.split("#")[0] for line in path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize(
    ("caddyfile", "upstream"), [("Caddyfile", "app:8501"), ("Caddyfile.oauth2-proxy", "oauth2-proxy:4180")]
)
def test_the_proxy_sets_tls_and_anti_framing_headers_and_drops_a_forged_identity(caddyfile, upstream):
    site = _caddy_site(DEPLOY / caddyfile)
    for header in (
        'Strict-Transport-Security "max-age=31536000',
        'X-Frame-Options "DENY"',
        "Content-Security-Policy \"frame-ancestors 'none'\"",
        'X-Content-Type-Options "nosniff"',
    ):
        assert header in site, (caddyfile, header)
    assert "request_header -X-Forwarded-Email" in site
    assert re.findall(r"reverse_proxy\s+(\S+)", site) == [upstream]
    assert "{$XAI_HOST}" in site and "admin off" in site


def test_the_oauth2_proxy_variant_mounts_its_caddyfile_over_the_default():
    override = yaml.safe_load((DEPLOY / "compose.oauth2-proxy.yaml").read_text(encoding="utf-8"))
    assert _mounts(override["services"]["proxy"])["/etc/caddy/Caddyfile"].startswith("./Caddyfile.oauth2-proxy:")
    environment = override["services"]["oauth2-proxy"]["environment"]
    assert environment["OAUTH2_PROXY_UPSTREAMS"] == "http://app:8501/"
    assert environment["OAUTH2_PROXY_PASS_USER_HEADERS"] == "true"
    assert "ports" not in override["services"]["oauth2-proxy"]
    assert not any(key.endswith(("SECRET", "CLIENT_ID")) for key in environment)  # those come from the env file


def test_the_example_configuration_is_a_valid_deployment_for_the_container(compose):
    example = (DEPLOY / "config" / "deploy.toml.example").read_text(encoding="utf-8")
    deployment = parse_deployment(example, Path("/config"))
    assert deployment.state_dir == Path("/state") and deployment.allowed_hosts
    for entry in deployment.datasets:
        assert entry.folder.is_relative_to("/datasets")  # the read-only mount
        assert all(card.is_relative_to("/datasets") for card in entry.models.values())
    secrets = tomllib.loads((DEPLOY / "config" / "secrets.toml.example").read_text(encoding="utf-8"))
    assert set(secrets["auth"]) >= {
        "redirect_uri",
        "cookie_secret",
        "client_id",
        "client_secret",
        "server_metadata_url",
    }
    assert secrets["auth"]["redirect_uri"].endswith("/oauth2callback")
    ignored = (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert {"/config/deploy.toml", "/config/secrets.toml", "/datasets/"} <= set(ignored)


# The entrypoint, outside a container.
def _handshake(port: int, host: str) -> int:
    """The HTTP status of a websocket upgrade on Streamlit's stream with this Host header (101: accepted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(
            (
                "GET /_stcore/stream HTTP/1.1\r\n"
                f"Host: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: streamlit\r\n\r\n"
            ).encode()
        )
        status_line = connection.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


@pytest.mark.slow
def test_the_entrypoint_serves_health_and_refuses_a_foreign_host(tiny_dataset, tmp_path):
    """``./run.sh host FILE``, as the image's ENTRYPOINT runs it (VENV: the project's venv, as the image's)."""
    models = sorted((tiny_dataset / "models").glob("classifier-fold-*.json"))
    toml = tmp_path / "deploy.toml"
    toml.write_text(
        "\n".join(
            [
                "[server]",
                f'state_dir = "{tmp_path / "state"}"',
                'allowed_hosts = ["xai.clinic.test", "127.0.0.1"]',
                "[auth]",
                'mode = "proxy"',
                "[users]",
                '"viewer@clinic.test" = "viewer"',
                "[datasets.tiny]",
                f'folder = "{tiny_dataset}"',
                "[datasets.tiny.models]",
                *(f'{card.stem.removeprefix("classifier-")} = "{card}"' for card in models),
            ]
        )
        + "\n"
    )
    port = free_port()
    log = tmp_path / "server.log"
    environment = {**os.environ, "VENV": sys.prefix, "HOME": str(tmp_path)}  # the venv running the tests
    environment.pop("XAI_DEPLOYMENT", None)
    with log.open("wb") as output:
        server = subprocess.Popen(
            # The image's ENTRYPOINT, then what a test needs instead of 0.0.0.0:8501 (options after the file win).
            ["./run.sh", "host", str(toml), "--server.address", "127.0.0.1", "--server.port", str(port)],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline, answer = time.monotonic() + 120, b""
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as reply:
                        answer = reply.read().strip()
                        break
                except OSError:
                    time.sleep(0.5)
            assert answer == b"ok", log.read_text(errors="replace")[-2000:]
            assert _handshake(port, "xai.clinic.test") == 101
            assert _handshake(port, f"127.0.0.1:{port}") == 101  # ports are ignored
            assert _handshake(port, "attacker.example") >= 400
            assert _handshake(port, "xai.clinic.test.attacker.example") >= 400
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "Installing" not in text  # the venv matched requirements.txt: nothing was installed at start
    assert str(tiny_dataset) not in text  # no server path of a dataset in the log


# The load benchmark (bench/hosted_load.py) is not a test; this only checks that it runs end to end.
@pytest.mark.slow
@pytest.mark.parametrize("client", ["browser", "ws"])
def test_the_hosted_load_bench_runs_with_two_sessions(client, tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)  # --prepare writes the score tables into the dataset's results/
    run = subprocess.run(
        [sys.executable, "bench/hosted_load.py", "--dataset", str(dataset), "--prepare", "--sessions", "2"]
        + ["--rounds", "1", "--timeout", "240", "--client", client],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "warm-up: {'explain': True, 'statistics': True, 'hpo': True}" in lines
    rows = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.split()[:1] in (["explain"], ["statistics"], ["hpo"])
    }
    assert set(rows) == {"explain", "statistics", "hpo"}
    for page, cells in rows.items():
        # Per condition: n, p50, p95, max, failed. Every session opened every page once, with its own title.
        without, with_job = cells[:5], cells[5:]
        assert without[0] == with_job[0] == "2" and without[4] == with_job[4] == "0", (page, cells)
        assert 0 < float(without[1]) <= float(without[2]) <= float(without[3])
    assert any(line.startswith("with job:") and "job running" in line for line in lines), lines[-3:]
