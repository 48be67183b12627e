"""The spec store's bounds (issue 13): caps on what is saved and loaded, pruning of unused specs, and no
pruning of a spec while it is being read."""

import dataclasses
import os
import threading
import time

import pytest

import cache.spec_store as spec_store_module
from cache.spec_store import SpecStore, UnknownSpecError, spec_caps
from core.deployment import Limits
from core.errors import RegionSpecError
from core.regions import PAPER_REGIONS, BoxRule, RegionRule, SpecCaps, bundled_region_specs, spec_id
from models.checkpoint import CARD_BYTES, WEIGHTS_BYTES

DAY = 24 * 3600
WIDE = dataclasses.replace(
    PAPER_REGIONS, name="wide", regions=(*PAPER_REGIONS.regions, RegionRule("skin", labels=(1,)))
)


def _age(path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def test_local_mode_caps_are_the_deployment_defaults():
    assert spec_caps(Limits()) == SpecCaps()
    assert (Limits().card_bytes, Limits().weights_bytes) == (CARD_BYTES, WEIGHTS_BYTES)
    assert SpecStore().caps == SpecCaps()


def test_specs_over_the_caps_are_neither_saved_nor_loaded(tmp_path):
    store = SpecStore(tmp_path, Limits(spec_regions=3, name_chars=8))
    with pytest.raises(RegionSpecError, match="has 4 regions; this server takes at most 3"):
        store.save(WIDE)
    with pytest.raises(RegionSpecError, match="its name is 9 characters long"):
        store.save(dataclasses.replace(PAPER_REGIONS, name="too long!"))
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused spec
    identifier = SpecStore(tmp_path).save(WIDE)  # stored under the default caps
    with pytest.raises(UnknownSpecError, match=f"region spec {identifier} cannot be read: .*at most 3"):
        store.load(identifier)
    small = SpecStore(tmp_path, Limits(spec_bytes=200))
    with pytest.raises(UnknownSpecError, match="larger than this server takes"):
        small.load(identifier)
    # A 20 MB file in the store's place is refused by its size, unread; and the message names no folder.
    (tmp_path / "0123456789ab.json").write_bytes(b" " * (20 << 20))
    with pytest.raises(UnknownSpecError) as refused:
        SpecStore(tmp_path).load("0123456789ab")
    assert str(tmp_path) not in str(refused.value)
    with pytest.raises(UnknownSpecError) as refused:
        SpecStore(tmp_path).load("x" * 20_000_000)
    assert len(str(refused.value)) < 200
    os.mkfifo(tmp_path / "fedcba987654.json")  # not a regular file: refused without opening it
    with pytest.raises(UnknownSpecError, match="not stored on this server"):
        SpecStore(tmp_path).load("fedcba987654")


def test_unused_specs_are_pruned_and_a_load_or_save_marks_a_spec_used(tmp_path):
    store = SpecStore(tmp_path, Limits(spec_days=30))
    kept, dropped, saved_again = store.save(WIDE), store.save(dataclasses.replace(WIDE, name="b")), None
    other = dataclasses.replace(
        PAPER_REGIONS, name="c", regions=(RegionRule("eye", boxes=(BoxRule((2, 3, 4, 5)),)),), gap_splits=()
    )
    saved_again = store.save(other)
    for identifier in (kept, dropped, saved_again):
        _age(tmp_path / f"{identifier}.json", 40)
    (tmp_path / ".abc.tmp").write_text("a crashed save")
    _age(tmp_path / ".abc.tmp", 2)
    (tmp_path / "notes.txt").write_text("not the store's")
    _age(tmp_path / "notes.txt", 400)
    assert store.load(kept) == WIDE  # a load marks it used ...
    assert store.save(other) == saved_again  # ... and so does saving it again
    assert store.prune() == [dropped]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".lock", ".pruned", f"{kept}.json", f"{saved_again}.json", "notes.txt"]
    )
    with pytest.raises(UnknownSpecError, match="not stored on this server .*unused for 30 days is pruned"):
        store.load(dropped)
    assert store.resolve("paper") == PAPER_REGIONS and store.reference(bundled_region_specs()["extended"]) == "extended"
    assert store.prune(days=1, now=time.time() + 2 * DAY) == sorted([kept, saved_again])


def test_saving_prunes_at_most_once_a_day(tmp_path):
    store = SpecStore(tmp_path)
    old = store.save(WIDE)
    _age(tmp_path / f"{old}.json", 100)
    _age(tmp_path / ".pruned", 2)
    store.save(PAPER_REGIONS)  # the last prune is two days old: this save prunes
    assert not (tmp_path / f"{old}.json").exists()
    again = store.save(WIDE)
    _age(tmp_path / f"{again}.json", 100)
    store.save(dataclasses.replace(WIDE, name="d"))  # pruned less than a day ago: no prune now
    assert (tmp_path / f"{again}.json").exists()


def test_a_spec_being_read_is_not_pruned_under_its_reader(tmp_path, monkeypatch):
    """The reader is held between finding the (100-day-old) file and marking it; prune must wait for it,
    then see the fresh mark and keep the file. Without the lock prune would delete it under the reader."""
    store = SpecStore(tmp_path)
    identifier = store.save(WIDE)
    _age(tmp_path / f"{identifier}.json", 100)
    reading, release = threading.Event(), threading.Event()
    real_mark = spec_store_module._mark_used

    def held_mark(path, modified=None):
        reading.set()
        release.wait(30)
        real_mark(path, modified)

    monkeypatch.setattr(spec_store_module, "_mark_used", held_mark)
    loaded, pruned = [], []
    reader = threading.Thread(target=lambda: loaded.append(store.load(identifier)))
    reader.start()
    assert reading.wait(30)
    pruner = threading.Thread(target=lambda: pruned.append(SpecStore(tmp_path).prune(days=90)))
    pruner.start()
    pruner.join(0.5)
    assert pruner.is_alive()  # waiting for the reader's shared lock
    release.set()
    reader.join(30)
    pruner.join(30)
    assert loaded == [WIDE] and pruned == [[]] and (tmp_path / f"{identifier}.json").exists()
    assert spec_id(loaded[0]) == identifier
