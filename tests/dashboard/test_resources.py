"""XAI_DEVICE (issue 12): read at the dashboard's edge, it decides where the loaded models run."""

import torch

import dashboard.resources as resources
from tests.dashboard.conftest import no_trouble, open_app, plain


def test_xai_device_reaches_the_loaded_classifier(on_tiny, monkeypatch):
    """PyTorch told it sees two GPUs; the loader records the device it is asked for (and loads on the CPU,
    the only device here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("XAI_DEVICE", "cuda:1")
    asked = []
    real = resources.load_classifier

    def recording(card_path, device="cpu", **kwargs):
        asked.append(device)
        return real(card_path, **kwargs)

    monkeypatch.setattr(resources, "load_classifier", recording)
    resources.classifier_from.clear()
    app = open_app()
    no_trouble(app)
    assert asked and set(asked) == {"cuda:1"}
    assert resources.device() == "cuda:1"


def test_unset_xai_device_is_auto_the_cpu_here(monkeypatch):
    monkeypatch.delenv("XAI_DEVICE", raising=False)
    assert not torch.cuda.is_available()
    assert resources.device() == "cpu"


def test_a_bad_xai_device_is_one_line_and_nothing_loads(on_tiny, monkeypatch):
    monkeypatch.setenv("XAI_DEVICE", "cuda")  # no GPU on this machine
    asked = []
    monkeypatch.setattr(resources, "load_classifier", lambda *args, **kwargs: asked.append(args))
    app = open_app()
    assert not app.exception
    assert [plain(e.value) for e in app.error] == [
        "XAI_DEVICE 'cuda': PyTorch sees no CUDA GPU on this machine (no driver, no GPU, or a CPU-only torch "
        "build); use cpu or auto"
    ]
    assert asked == []


def test_a_cache_folder_that_cannot_be_created_leaves_the_page_working_with_one_notice(on_tiny, tmp_path, monkeypatch):
    """$XAI_CACHE_DIR under a regular file (as a read-only or full disk would): the explain page still
    predicts and says once that nothing is cached, naming the folder in local mode only."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "file" / "cache"))
    resources._result_cache.clear()
    app = open_app({"methods": "Gradient"})
    no_trouble(app)
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    notices = [plain(w.value) for w in app.warning if "not being cached" in w.value]
    assert notices == [
        f"Results are not being cached: Not a directory (cache folder {tmp_path / 'file' / 'cache'}). "
        "The pages work without the cache; each result is computed again."
    ]
    monkeypatch.setattr(resources.hosting, "hosted", lambda: True)  # hosted pages name no server path
    app.run()
    no_trouble(app)
    assert [plain(w.value) for w in app.warning if "not being cached" in w.value] == [
        "Results are not being cached: Not a directory. The pages work without the cache; each result is computed "
        "again."
    ]


def test_a_full_disk_while_storing_is_a_notice_not_a_traceback(on_tiny, monkeypatch):
    import sqlite3

    import diskcache

    def full(*args, **kwargs):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise error

    monkeypatch.setattr(diskcache.Cache, "set", full)
    resources._result_cache.clear()
    app = open_app({"methods": "Gradient"})
    no_trouble(app)
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert [plain(w.value) for w in app.warning if "not being cached" in w.value] == [
        f"Results are not being cached: database or disk is full (cache folder {resources._result_folder()}). "
        "The pages work without the cache; each result is computed again."
    ]
    monkeypatch.undo()  # the disk has room again: the next run caches and says nothing
    app.run()
    no_trouble(app)
    assert not [plain(w.value) for w in app.warning if "not being cached" in w.value]


def test_an_opted_in_upload_is_cached_apart_and_its_entries_expire(on_tiny, tmp_path, monkeypatch):
    """Opting in caches the upload's results in cache/uploads (never the shared result cache), with entries
    that expire after Limits.upload_cache_days; an entry planted 8 days ago is gone when the cache opens."""
    import time

    from cache import MISSING, DiskCache
    from core.deployment import Limits
    from core.synth import plan_images
    from core.synth.faces import render_face
    from tests.dashboard.conftest import png_bytes

    uploads = tmp_path / "cache" / "uploads"
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - (Limits().upload_cache_days + 1) * 86400)
    planted = DiskCache(uploads, expire_days=Limits().upload_cache_days)
    planted.store("old upload", b"an old photo's result")
    planted.close()
    monkeypatch.setattr(time, "time", lambda: now)
    resources._upload_cache.clear()
    face = render_face(plan_images(1, seed=5, size=160)[0].params).image
    app = open_app({"source": "upload", "methods": "Gradient"})
    app.file_uploader(key="upload").upload("face.png", png_bytes(face), "image/png")
    app.checkbox(key="keep_upload").check()
    app.run()
    no_trouble(app)
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    cache = resources.upload_cache()
    assert cache.directory == uploads and cache.lookup("old upload") is MISSING
    assert len(cache) > 0  # this upload's face, maps and scores
    results = tmp_path / "cache" / "results"
    assert not results.exists() or len(DiskCache(results)) == 0


def test_weights_replaced_on_disk_under_an_untouched_card_are_reloaded(tiny_dataset, tmp_path):
    import os
    import shutil

    from models.checkpoint import ModelCard, save_checkpoint
    from tests.conftest import tiny_resnet

    models = tmp_path / "models"
    shutil.copytree(tiny_dataset / "models", models)
    card_path = models / "classifier-fold-1.json"
    card = ModelCard.from_json(card_path)
    resources.classifier_from.clear()
    before = resources.classifier(str(card_path))
    assert resources.classifier(str(card_path)) is before
    card_stamp = card_path.stat().st_mtime_ns
    other = save_checkpoint(tiny_resnet(num_classes=len(card.classes), seed=7), card, tmp_path / "other", "retrained")
    os.replace(other.parent / ModelCard.from_json(other).weights, models / card.weights)  # the weights only
    assert card_path.stat().st_mtime_ns == card_stamp
    after = resources.classifier(str(card_path))
    assert after is not before and after.fingerprint != before.fingerprint
