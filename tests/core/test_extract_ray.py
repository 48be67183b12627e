"""The Ray engine against the local one on a tiny synthetic dataset: a local Ray cluster of 2 CPUs, two actors.

The local engine (``core.extract.extract_scores``) is the reference: both run ``score_batch`` on the same
batches, so the tables, stores and cache entries must be equal. Equal means exact here (same code, same
CPU, same batches, float32 throughout); the tolerance stated in the assertions (1e-6 relative, float32
rounding) only allows for a different BLAS thread count in the actors (Ray gives each one CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import polars as pl
import pytest

from cache import DiskCache
from core.dataset import open_dataset
from core.errors import UserFacingError
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.extract_ray import RayClusterError, _check_reachable, extract_scores_ray, pool_shape
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from models.checkpoint import save_checkpoint
from tests.conftest import REPO, tiny_card, tiny_resnet, tiny_synthetic_dataset

CLASSES = ("KS", "Unaffected", "WS")
METHODS = ("Gradient", "LayerGradCam")
KEY = ["model", "method", "image_name", "region"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """18 faces of 3 classes (as tests/core/test_extract.py), two fold models of 64 px."""
    root = tmp_path_factory.mktemp("extract-ray") / "data"
    tiny_synthetic_dataset(root, CLASSES, n_per_class=6, test_fraction=0.34)
    cards = [
        save_checkpoint(
            tiny_resnet(num_classes=3, seed=f),
            tiny_card(CLASSES, 64, weights="w", fold=f"fold-{f}"),
            root / "models",
            f"classifier-fold-{f}",
        )
        for f in (1, 2)
    ]
    return open_dataset(root), load_classifiers(cards)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (its start-up costs seconds): 2 CPUs, small object store."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,  # no runtime_env: the engine itself gives its actors the project's path
    )
    yield ray
    ray.shutdown()


def assert_same_tables(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.schema == want.schema and got.height == want.height
    assert got.drop("score").equals(want.drop("score"))  # same rows, same order, same labels and classes
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-6, atol=1e-9)


def assert_same_stores(got: RelevanceStore, want: RelevanceStore) -> None:
    assert got.complete and want.complete
    assert got.contents == want.contents
    assert got.rows().equals(want.rows())
    np.testing.assert_array_equal(got.label_maps(), want.label_maps())
    for model in want.contents.models:
        for method in want.contents.methods:
            a, b = got.maps(model.name, method), want.maps(model.name, method)
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)
            assert (a == b).mean() > 0.999  # float16 maps: equal but for a rounding tie now and then


def assert_close(a: object, b: object) -> None:
    """Cache values alike: arrays to float32 rounding, containers element-wise, anything else equal."""
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
        if np.issubdtype(b.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)
    elif isinstance(b, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y)
    elif dataclasses.is_dataclass(b) and not isinstance(b, type):
        assert type(a) is type(b)
        for field in dataclasses.fields(b):
            assert_close(getattr(a, field.name), getattr(b, field.name))
    else:
        assert a == b


def cache_values(directory: Path) -> dict[str, object]:
    with diskcache.Cache(str(directory)) as cache:
        return {key: cache.get(key) for key in cache}


@pytest.fixture(scope="module")
def local_run(tiny, tmp_path_factory):
    dataset, classifiers = tiny
    folder = tmp_path_factory.mktemp("local")
    table = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"),
        ExplainSettings(methods=METHODS, batch_size=2),
        cache=DiskCache(folder / "cache"),
        store=RelevanceStore(folder / "store"),
    )
    return table, folder


@pytest.mark.slow
def test_ray_writes_the_table_store_and_cache_of_the_local_engine(tiny, local_run, ray_cluster, tmp_path):
    dataset, classifiers = tiny
    want, local = local_run
    progress: list[tuple[int, int, str]] = []
    got = extract_scores_ray(
        ExtractionPlan(dataset, classifiers, "val"),
        ExplainSettings(methods=METHODS, batch_size=2),
        cache=DiskCache(tmp_path / "cache"),
        store=RelevanceStore(tmp_path / "store"),
        progress=lambda *p: progress.append(p),
        actors=2,
    )
    assert_same_tables(got, want)
    assert_same_stores(RelevanceStore(tmp_path / "store"), RelevanceStore(local / "store"))
    mine, theirs = cache_values(tmp_path / "cache"), cache_values(local / "cache")
    assert set(mine) == set(theirs) and mine  # the same content keys: the same entries
    for key, value in theirs.items():
        assert_close(mine[key], value)
    assert progress[-1][0] == progress[-1][1] == want["image_name"].n_unique() * len(METHODS)


def die_once(marker: str, count_file: str, module, inputs) -> None:
    """Forward pre-hook shipped with the network: logs each forward; the first actor process to run its
    third forward creates ``marker`` and dies on the spot (``os._exit``), once for the whole run."""
    with open(count_file, "a") as log:
        log.write(f"{os.getpid()}\n")
    with open(count_file) as log:
        mine = sum(line.strip() == str(os.getpid()) for line in log)
    if mine >= 3:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_the_run_completes_equal(tiny, local_run, ray_cluster, tmp_path):
    dataset, _ = tiny
    want, local = local_run
    marker, forwards = tmp_path / "died", tmp_path / "forwards.log"
    classifiers = load_classifiers(sorted(dataset.layout.classifier_cards()))
    for classifier in classifiers.values():
        classifier.network.register_forward_pre_hook(functools.partial(die_once, str(marker), str(forwards)))
    plan = ExtractionPlan(dataset, classifiers, "val")
    settings = ExplainSettings(methods=METHODS, batch_size=2)
    got = extract_scores_ray(
        plan, settings, cache=DiskCache(tmp_path / "cache"), store=RelevanceStore(tmp_path / "store"), actors=2
    )
    assert marker.exists()  # an actor did die mid-run
    assert_same_tables(got, want)
    assert_same_stores(RelevanceStore(tmp_path / "store"), RelevanceStore(local / "store"))

    # A rerun finds everything in the cache: no network runs at all.
    forwards.unlink()
    again = extract_scores_ray(
        plan, settings, cache=DiskCache(tmp_path / "cache"), store=RelevanceStore(tmp_path / "store"), actors=2
    )
    assert not forwards.exists()
    assert_same_tables(again, want)


def test_pool_shape_one_actor_per_gpu_else_cpu_actors():
    assert pool_shape({"CPU": 16.0, "GPU": 4.0}, None) == (4, 1.0, 1.0)
    assert pool_shape({"CPU": 16.0, "GPU": 4.0}, 2) == (2, 1.0, 1.0)
    assert pool_shape({"CPU": 16.0, "GPU": 2.0}, 8) == (2, 1.0, 1.0)  # never two actors on one GPU
    assert pool_shape({"CPU": 2.0}, 2) == (2, 1.0, 0.0)
    assert pool_shape({"CPU": 8.0}, 3) == (3, 2.0, 0.0)
    assert pool_shape({"CPU": 4.0}, None) == (4, 1.0, 0.0)
    with pytest.raises(UserFacingError, match="at least 1"):
        pool_shape({"CPU": 4.0}, 0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_address_is_refused_quickly():
    start = time.monotonic()
    with pytest.raises(RayClusterError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+"):
        _check_reachable(f"127.0.0.1:{free_port()}")
    with pytest.raises(RayClusterError, match="not auto, HOST:PORT"):
        _check_reachable("nonsense")
    assert time.monotonic() - start < 15


CLI = """
import sys
from core.cli import main
code = main(sys.argv[1:])
print("RAY IMPORTED" if "ray" in sys.modules else "NO RAY", file=sys.stderr)
sys.exit(code)
"""


def run_cli(folder: Path, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XAI_CACHE_DIR": str(folder / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-c", CLI, *arguments], env=env, cwd=folder, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_the_local_engine_imports_no_ray_and_a_bad_address_is_one_line(tiny, tmp_path):
    dataset, _ = tiny
    common = ["extract", str(dataset.root), "--methods", "Gradient", "--folds", "fold-1", "--quiet"]
    local = run_cli(tmp_path, *common, "--out", str(tmp_path / "local.parquet"), "--store", str(tmp_path / "s"))
    assert local.returncode == 0, local.stderr
    assert "NO RAY" in local.stderr
    assert pl.read_parquet(tmp_path / "local.parquet").height > 0

    start = time.monotonic()
    bad = run_cli(tmp_path, *common, "--engine", "ray", "--address", f"127.0.0.1:{free_port()}", "--no-store")
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line != "RAY IMPORTED"]
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr
    assert time.monotonic() - start < 120  # bounded: the interpreter's and torch's start-up, then a 10 s connect


def test_ray_options_without_the_ray_engine_are_refused(tiny, capsys):
    from core.cli import main as cli_main

    dataset, _ = tiny
    assert cli_main(["extract", str(dataset.root), "--actors", "2", "--no-store", "--no-cache"]) == 2
    assert "--address and --actors go with --engine ray" in capsys.readouterr().err


def test_the_jobs_engine_comes_from_the_environment(monkeypatch):
    from core.job_queue import ENGINE_ENV, extraction_engine

    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert extraction_engine() == "local"
    monkeypatch.setenv(ENGINE_ENV, " Ray ")
    assert extraction_engine() == "ray"
    monkeypatch.setenv(ENGINE_ENV, "spark")
    with pytest.raises(UserFacingError, match="XAI_EXTRACT_ENGINE must be local or ray, not 'spark'"):
        extraction_engine()
