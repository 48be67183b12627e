"""The CLI's training flags are the config dataclasses' fields: a new field is a new flag, with its help and choices."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import pytest

from core.cli import add_config_flags, build_parser, config_from_args, main
from core.train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig
from core.train_parser import ParserConfig
from models.resnet import ARCHITECTURES


def _options(command: str) -> dict[str, argparse.Action]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in subcommands.choices[command]._actions}


def choices(action: argparse.Action) -> tuple:
    assert action.choices is not None, f"--{action.dest} has no choices"
    return tuple(action.choices)


@pytest.mark.parametrize(("command", "config_type"), [("train", TrainConfig), ("train-parser", ParserConfig)])
def test_every_config_field_is_a_flag_with_help(command, config_type):
    options = _options(command)
    for field in dataclasses.fields(config_type):
        assert field.name in options, f"{config_type.__name__}.{field.name} has no flag"
        assert options[field.name].default is None  # unset: the dataclass's default applies
        assert field.metadata.get("help") and options[field.name].help


def test_choices_come_from_the_owning_modules():
    train, parser_training = _options("train"), _options("train-parser")
    assert choices(train["architecture"]) == ARCHITECTURES
    assert choices(train["optimizer"]) == OPTIMIZERS
    assert choices(train["schedule"]) == SCHEDULES
    assert choices(train["precision"]) == choices(parser_training["precision"]) == PRECISIONS


def test_flags_fill_the_config_and_leave_the_rest_to_its_defaults():
    args = build_parser().parse_args(
        [
            "train",
            "data",
            "--epochs",
            "3",
            "--no-flip",
            "--learning-rate",
            "0.1",
            "--init",
            "start.pt",
            "--schedule",
            "one-cycle",
            "--folds",
            "fold-1",
        ]
    )
    assert config_from_args(TrainConfig, args) == TrainConfig(
        epochs=3, flip=False, learning_rate=0.1, init="start.pt", schedule="one-cycle"
    )
    args = build_parser().parse_args(["train-parser", "data", "--held-out-fraction", "0.3"])
    assert config_from_args(ParserConfig, args) == ParserConfig(held_out_fraction=0.3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--architecture", "vgg16"])


@dataclasses.dataclass(frozen=True)
class _Knobs:
    size: int = dataclasses.field(default=8, metadata={"help": "side in pixels"})
    flip: bool = dataclasses.field(default=True, metadata={"help": "random flips"})
    verbose: bool = dataclasses.field(default=False, metadata={"help": "chatty logs"})
    init: str | None = dataclasses.field(default=None, metadata={"help": "where to start"})
    mode: str = dataclasses.field(default="a", metadata={"help": "a or b, 100% sure", "choices": ("a", "b")})


def test_a_new_field_is_a_new_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Knobs)
    assert config_from_args(_Knobs, parser.parse_args([])) == _Knobs()
    args = parser.parse_args(["--size", "4", "--no-flip", "--verbose", "--init", "x", "--mode", "b"])
    assert config_from_args(_Knobs, args) == _Knobs(size=4, flip=False, verbose=True, init="x", mode="b")
    text = parser.format_help()
    assert "side in pixels (default: 8)" in text and "100% sure (default: a)" in text
    assert "turn off random flips" in text and "turn on chatty logs" in text


@pytest.mark.parametrize("argv", [["explain", "face.jpg"], ["extract"]])
def test_the_landmark_parser_flag_reaches_the_settings(argv):
    """Issue 14: what parses a face with neither a stored map nor a parser is a flag of explain and extract,
    and its choices are the pipeline's."""
    from core.cli import _settings
    from core.pipeline import LANDMARK_PARSERS

    assert _settings(build_parser().parse_args([*argv, "--methods", "Gradient"])).landmark_parser == "landmarks68"
    for choice in LANDMARK_PARSERS:
        args = build_parser().parse_args([*argv, "--methods", "Gradient", "--landmark-parser", choice])
        assert _settings(args).landmark_parser == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--landmark-parser", "mediapipe"])


def test_prune_specs_prunes_the_local_spec_store_and_a_datasets_region_masks(tmp_path, monkeypatch, capsys):
    from cache.spec_store import SpecStore, default_spec_dir
    from core.regions import PAPER_REGIONS

    monkeypatch.delenv("XAI_DEPLOYMENT", raising=False)
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "cache" / "results"))
    store = SpecStore(default_spec_dir())
    identifier = store.save(dataclasses.replace(PAPER_REGIONS, name="edited"))
    masks = tmp_path / "data" / "results" / "relevance" / "val" / "region-masks" / "label-maps-x"
    masks.mkdir(parents=True)
    (masks / "k.npz").write_bytes(b"memo")
    long_ago = time.time() - 100 * 24 * 3600
    for path in (default_spec_dir() / f"{identifier}.json", masks / "k.npz"):
        os.utime(path, (long_ago, long_ago))
    assert main(["prune-specs", "--dataset", str(tmp_path / "data")]) == 0
    assert "pruned 1 stored spec(s) and 1 region mask file(s) unused for 90 days" in capsys.readouterr().out
    assert not (masks / "k.npz").exists() and not (default_spec_dir() / f"{identifier}.json").exists()
    assert main(["prune-specs", "--days", "0"]) == 2


def test_prune_specs_in_hosted_mode_uses_the_deployments_folders_and_limit(tmp_path, monkeypatch, capsys):
    from cache.spec_store import SpecStore
    from core.deployment import read_deployment
    from core.regions import PAPER_REGIONS

    toml = tmp_path / "deployment.toml"
    toml.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n[limits]\nspec_days = 10\n'
        f'[datasets.clinic]\nfolder = "{tmp_path / "clinic"}"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("XAI_DEPLOYMENT", str(toml))
    deployment = read_deployment(toml)
    store = SpecStore(deployment.spec_dir, deployment.limits)
    old, recent = (store.save(dataclasses.replace(PAPER_REGIONS, name=name)) for name in ("old", "recent"))
    masks = deployment.results("clinic") / "versions" / "val" / "1" / "relevance" / "region-masks" / "maps"
    masks.mkdir(parents=True)
    (masks / "k.npz").write_bytes(b"memo")
    eleven_days = time.time() - 11 * 24 * 3600
    for path in (deployment.spec_dir / f"{old}.json", masks / "k.npz"):
        os.utime(path, (eleven_days, eleven_days))
    assert main(["prune-specs"]) == 0
    assert "pruned 1 stored spec(s) and 1 region mask file(s) unused for 10 days" in capsys.readouterr().out
    assert [path.stem for path in deployment.spec_dir.glob("*.json")] == [recent]
