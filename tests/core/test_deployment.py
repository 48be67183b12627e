"""core.deployment: deploy/example.toml parses as documented; roles, groups and visibility by hand-worked
cases; every malformed file is refused with a DeploymentError rather than read or half-parsed."""

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from core.deployment import (
    DEPLOYMENT_ENV,
    Deployment,
    DeploymentError,
    Limits,
    Person,
    deployment_from_environment,
    parse_deployment,
    read_deployment,
)
from core.errors import UserFacingError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "example.toml"
MINIMAL = """
[server]
state_dir = "state"
[datasets.demo]
folder = "demo"
"""


@pytest.fixture(scope="module")
def example() -> Deployment:
    return read_deployment(EXAMPLE)


def test_the_example_file_parses_as_it_documents(example):
    assert [entry.id for entry in example.datasets] == ["nih-faces", "demo"]
    nih, demo = example.datasets
    assert nih.title == "NIH Faces, five-fold models" and nih.folder == Path("/srv/face-xai/datasets/nih-faces")
    assert dict(nih.models) == {
        "fold-1": Path("/srv/face-xai/datasets/nih-faces/models/classifier-fold-1.json"),
        "fold-2": Path("/srv/face-xai/datasets/nih-faces/models/classifier-fold-2.json"),
    }
    assert nih.parser == Path("/srv/face-xai/datasets/nih-faces/models/face-parser.json")
    assert nih.roles == {"analyst"} and nih.groups == {"dysmorphology"}
    # Relative paths are taken from the file's folder; defaults fill what a table leaves out.
    assert demo.folder == (REPO / "data" / "demo").resolve() and demo.parser is None
    assert demo.roles == {"viewer", "analyst"} and demo.groups == frozenset()
    assert example.state_dir == Path("/srv/face-xai/state") and example.allowed_hosts == ("xai.example.org",)
    assert (example.auth, example.groups_claim, example.proxy_header) == ("oidc", "groups", "X-Forwarded-Email")
    assert dict(example.users) == {"genetics.lead@example.org": "analyst", "clinician@example.org": "viewer"}
    assert dict(example.groups) == {"dysmorphology": "viewer"}


def test_the_example_documents_every_limit_with_its_default(example):
    written = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["limits"]
    assert set(written) == {field.name for field in dataclasses.fields(Limits)}
    assert example.limits == Limits()


def test_a_role_is_the_higher_of_a_persons_own_and_their_groups(example):
    assert example.person("  Clinician@Example.ORG ").role == "viewer"  # e-mail in any case, trimmed
    assert example.person("genetics.lead@example.org").role == "analyst"
    assert example.person("stranger@example.org").role is None
    assert example.person("stranger@example.org", frozenset({"dysmorphology"})).role == "viewer"
    assert example.person("stranger@example.org", frozenset({"other"})).role is None
    both = parse_deployment(
        MINIMAL + '[users]\n"a@x.org" = "viewer"\n[groups]\nleads = "analyst"\n', Path("/srv")
    ).person("a@x.org", frozenset({"leads"}))
    assert both.role == "analyst"


def test_an_analyst_may_do_what_a_viewer_may_and_no_role_may_nothing():
    analyst, viewer, nobody = Person("a", "analyst"), Person("v", "viewer"), Person("n", None)
    assert analyst.may("viewer") and analyst.may("analyst")
    assert viewer.may("viewer") and not viewer.may("analyst")
    assert not nobody.may("viewer") and not nobody.may("analyst")


def test_each_person_sees_the_datasets_their_role_or_group_opens(example):
    def seen(email: str, *groups: str) -> list[str]:
        return [entry.id for entry in example.visible(example.person(email, frozenset(groups)))]

    assert seen("clinician@example.org") == ["demo"]  # nih-faces: analysts or the dysmorphology group
    assert seen("clinician@example.org", "dysmorphology") == ["nih-faces", "demo"]
    assert seen("genetics.lead@example.org") == ["nih-faces", "demo"]
    assert seen("stranger@example.org") == []
    # A group naming a dataset does not open it without a role: the person must be let in first.
    assert example.visible(Person("x@y.org", None, frozenset({"dysmorphology"}))) == ()


def test_state_paths_are_all_under_the_state_folder_and_unknown_ids_are_refused(example):
    state = example.state_dir
    for path in (example.cache_dir, example.spec_dir, example.upload_cache_dir, example.jobs_db, example.audit_log):
        assert path.is_relative_to(state)
    assert example.results("demo") == state / "results" / "demo"
    for unknown in ("nope", "../demo", "demo/.."):
        with pytest.raises(DeploymentError):
            example.results(unknown)
        with pytest.raises(DeploymentError):
            example.dataset(unknown)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("[datasets.Bad]\nfolder = 'x'\n", "short id"),
        ("[datasets.'../up']\nfolder = 'x'\n", "short id"),
        (f"[datasets.{'a' * 33}]\nfolder = 'x'\n", "short id"),
        ("[datasets.other]\nfolder = 'x'\nmodels = { 'Fold 1' = 'c.json' }\n", "short id"),
        ("[datasets.other]\nfolder = 'x'\nroles = ['admin']\n", "must be one of viewer, analyst"),
        ("[datasets.other]\ntitle = 'no folder'\n", "must be a path"),
        ("[datasets.other]\nfolder = 'x'\nmodels = 'c.json'\n", "models must be a table"),
        ("[users]\n'a@x.org' = 'owner'\n", "must be one of viewer, analyst"),
        ("[groups]\nleads = 'root'\n", "must be one of viewer, analyst"),
        ("[auth]\nmode = 'basic'\n", "mode must be one of oidc, proxy"),
        ("[limits]\nspec_region = 10\n", "unknown [limits] key(s): spec_region"),
        ("[limits]\nspec_regions = 0\n", "whole number"),
        ("[limits]\nspec_regions = true\n", "whole number"),
        ("[limits]\nspec_regions = 2.5\n", "whole number"),
    ],
)
def test_malformed_files_are_refused_with_a_message(extra, words, tmp_path):
    with pytest.raises(DeploymentError, match=re.escape(words)):
        parse_deployment(MINIMAL + extra, tmp_path)


def test_a_file_without_datasets_or_valid_toml_is_refused(tmp_path):
    with pytest.raises(DeploymentError, match="serves no dataset"):
        parse_deployment("[server]\nstate_dir = 'state'\n", tmp_path)
    with pytest.raises(DeploymentError, match="not valid TOML"):
        parse_deployment("[server\n", tmp_path)
    with pytest.raises(DeploymentError, match="state_dir must be a path"):
        parse_deployment("[datasets.demo]\nfolder = 'x'\n", tmp_path)
    assert issubclass(DeploymentError, UserFacingError)


def test_only_a_regular_file_of_at_most_1_mb_is_read(tmp_path):
    with pytest.raises(DeploymentError, match="cannot be read"):
        read_deployment(tmp_path / "missing.toml")
    with pytest.raises(DeploymentError, match="regular file"):
        read_deployment(tmp_path)  # a folder
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(DeploymentError, match="regular file"):
        read_deployment(fifo)  # would block a reader forever, as /dev/zero would read forever
    with pytest.raises(DeploymentError, match="regular file"):
        read_deployment("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_text(MINIMAL + "#" * (1 << 20) + "\n", encoding="utf-8")
    with pytest.raises(DeploymentError, match="at most 1 MB"):
        read_deployment(big)
    fine = tmp_path / "fine.toml"
    fine.write_text(MINIMAL, encoding="utf-8")
    assert read_deployment(fine).datasets[0].folder == tmp_path / "demo"


def test_the_environment_variable_chooses_hosted_mode(tmp_path, monkeypatch):
    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)
    assert deployment_from_environment() is None
    monkeypatch.setenv(DEPLOYMENT_ENV, str(EXAMPLE))
    assert deployment_from_environment() == read_deployment(EXAMPLE)
