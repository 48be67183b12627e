"""The CLI's training flags are the config dataclasses' fields: a new field is a new flag, with its help and choices."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from core.cli import add_config_flags, build_parser, config_from_args
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
