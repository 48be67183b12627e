"""Picking N faces out of a split: evenly spaced, so a class-ordered list keeps every class's share."""

import pytest

from core.dataset import DatasetError, evenly_spaced


def test_evenly_spaced_by_hand():
    names = [f"n{i}" for i in range(10)]
    assert evenly_spaced(names, 4) == ["n0", "n3", "n6", "n9"]  # 9 / 3 = 3 apart
    assert evenly_spaced(names[:7], 3) == ["n0", "n3", "n6"]
    assert evenly_spaced(names, 1) == ["n0"]
    assert evenly_spaced(names, None) == evenly_spaced(names, 10) == evenly_spaced(names, 99) == names


def test_a_class_ordered_split_keeps_every_class_share():
    names = [f"{label}Slide{i}.png" for label in ("KS", "NS", "WS") for i in range(20)]
    picked = evenly_spaced(names, 9)
    assert [name[:2] for name in picked] == ["KS"] * 3 + ["NS"] * 3 + ["WS"] * 3


def test_picks_are_distinct_in_order_and_span_the_list():
    for n in range(2, 40):
        names = [f"n{i:02d}" for i in range(n)]
        for limit in range(2, n):
            picked = evenly_spaced(names, limit)
            assert len(set(picked)) == limit and picked == sorted(picked)
            assert picked[0] == names[0] and picked[-1] == names[-1]


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused(limit):
    with pytest.raises(DatasetError, match=f"a limit of {limit} faces leaves none to use; give at least 1"):
        evenly_spaced(["a", "b"], limit)


@pytest.mark.parametrize("command", ["benchmark", "faithfulness", "sanity"])
def test_every_command_with_a_limit_refuses_one_below_one(tmp_path, capsys, command):
    """The three commands pick their faces through evenly_spaced: --limit 0 is one clear line, not a
    silent 'all faces' (benchmark did that before) nor a traceback."""
    from core.cli import main
    from models.checkpoint import ModelCard, save_checkpoint
    from tests.conftest import tiny_resnet

    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "partitions.csv").write_text("image_name,label,fold-1\na.png,A,test\nb.png,B,test\n")
    (tmp_path / "metadata" / "ground_truth.csv").write_text("image_name,region\n")
    card = ModelCard(
        kind="classifier",
        architecture="resnet18",
        classes=("A", "B"),
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        weights="classifier-fold-1.safetensors",
        fold="fold-1",
    )
    save_checkpoint(tiny_resnet(num_classes=2), card, tmp_path / "models", "classifier-fold-1")
    assert main([command, str(tmp_path), "--limit", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a limit of 0 faces leaves none to use") and "Traceback" not in err
