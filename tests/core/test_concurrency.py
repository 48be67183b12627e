"""Simultaneous sessions and a cache under pressure.

Eight sessions explain different photos with different methods on two shared models, as threads
of one process and as eight spawned processes sharing one cache folder; every result is
bit-identical to the serial run, and nothing deadlocks (each wait is bounded). Sessions i and i+4
explain the same photo with the same model, so two of them race for the same cache entries.

Every run here uses one torch thread (the processes too): the serial reference and the sessions
must run the same kernels to be comparable bit for bit, and eight processes on two cores would
otherwise spin-wait each other.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest
import torch

from cache import MISSING, DiskCache
from core.dataset import Photo
from core.explain import explain
from core.pipeline import ExplainSettings
from core.synth import FaceParams, render_face, sample_face_shape, sample_photo
from models.checkpoint import Classifier, load_classifier, save_checkpoint
from tests.conftest import tiny_card, tiny_resnet

SIZE = 48  # aligned face of the tiny models
SESSIONS = 8
METHODS = (
    "SmoothGrad",
    "IntegratedGradients",
    "GuidedBackprop",
    "LRP-EpsilonPlus",
    "DeepLIFT",
    "LayerGradCam",
    "Occlusion",
    "LRP-EpsilonAlpha2Beta1Flat",
)
WAIT_S = 240  # bounded waits: a deadlock fails the test instead of hanging it


def face(seed: int):
    rng = np.random.default_rng(seed)
    return render_face(FaceParams(sample_face_shape(rng), sample_photo(rng), (), 96))


def session_plan(i: int) -> tuple[int, int, list[str]]:
    """Photo, model and methods of session i: i and i+4 share photo, model and "Gradient"."""
    return i % 4, i % 2, [METHODS[i], "Gradient"]


def run_session(i: int, card_paths: Sequence[str | Classifier], cache: DiskCache | None) -> dict[str, np.ndarray]:
    photo, model, methods = session_plan(i)
    rendered = face(photo)
    card_or_classifier = card_paths[model]
    classifier = load_classifier(card_or_classifier) if isinstance(card_or_classifier, str) else card_or_classifier
    result = explain(
        Photo(rendered.image, rendered.landmarks), classifier, ExplainSettings(methods=tuple(methods)), cache
    )
    arrays = {"probabilities": result.probabilities, "masks": result.face.masks}
    for method in methods:
        arrays[f"map {method}"] = result.maps[method]
        arrays[f"scores {method}"] = result.scores[method]
    return arrays


def assert_identical(expected: list[dict], got: Sequence[dict | None]) -> None:
    for i, (reference, result) in enumerate(zip(expected, got)):
        assert result is not None, f"session {i} produced nothing"
        assert reference.keys() == result.keys()
        for key in reference:
            assert reference[key].dtype == result[key].dtype
            np.testing.assert_array_equal(result[key], reference[key], err_msg=f"session {i}: {key}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def card_paths(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        card = tiny_card(("A", "B", "Unaffected"), SIZE)
        paths.append(str(save_checkpoint(tiny_resnet(num_classes=3, seed=seed), card, folder, f"model-{seed}")))
    return paths


@pytest.fixture(scope="module")
def serial(card_paths) -> list[dict]:
    classifiers = [load_classifier(p) for p in card_paths]
    return [run_session(i, classifiers, cache=None) for i in range(SESSIONS)]


def run_threads(classifiers, cache) -> list[dict | None]:
    results: list[dict | None] = [None] * SESSIONS
    barrier = threading.Barrier(SESSIONS)

    def work(i):
        barrier.wait(timeout=WAIT_S)
        results[i] = run_session(i, classifiers, cache)

    with ThreadPoolExecutor(SESSIONS) as pool:
        futures = [pool.submit(work, i) for i in range(SESSIONS)]
        done, pending = wait(futures, timeout=WAIT_S)
        assert not pending, f"{len(pending)} sessions still running after {WAIT_S} s: deadlock?"
        for future in done:
            future.result()  # re-raise any session's error here
    return results


@pytest.mark.timeout(600)
def test_eight_threads_on_shared_models_and_cache_equal_the_serial_run(card_paths, serial, tmp_path):
    classifiers = [load_classifier(p) for p in card_paths]
    cache = DiskCache(tmp_path / "cache")
    assert_identical(serial, run_threads(classifiers, cache))  # computing and storing at once
    assert_identical(serial, run_threads(classifiers, cache))  # every answer now from the cache
    assert_identical(serial, run_threads(classifiers, None))  # no cache: the models' locks alone


def _process_session(i: int, card_paths: list[str], cache_dir: str, barrier, queue) -> None:
    """Session i in its own process: computing (all eight at once), then again once all are done,
    when every answer is in the shared cache."""
    torch.set_num_threads(1)
    try:
        cache = DiskCache(cache_dir)
        for round_ in (0, 1):
            barrier.wait(timeout=WAIT_S)
            queue.put((round_, i, os.getpid(), run_session(i, card_paths, cache)))
    except BaseException as error:  # reported to the parent, which fails the test with it
        queue.put((-1, i, os.getpid(), repr(error)))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_processes_sharing_one_cache_folder_equal_the_serial_run(card_paths, serial, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(SESSIONS), context.Queue()
    processes = [
        context.Process(target=_process_session, args=(i, card_paths, str(tmp_path / "cache"), barrier, queue))
        for i in range(SESSIONS)
    ]
    for process in processes:
        process.start()
    rounds: list[list] = [[None] * SESSIONS, [None] * SESSIONS]
    pids = set()
    deadline = time.monotonic() + WAIT_S
    try:
        for _ in range(2 * SESSIONS):
            round_, i, pid, result = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            assert round_ >= 0, f"session {i} failed: {result}"
            rounds[round_][i] = result
            pids.add(pid)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert len(pids) == SESSIONS and os.getpid() not in pids
    assert_identical(serial, rounds[0])  # computed and stored concurrently
    assert_identical(serial, rounds[1])  # read back from the shared folder


# ---------------------------------------------------------------- the cache under pressure


@pytest.mark.timeout(300)
def test_sessions_on_a_cache_smaller_than_their_results_stay_exact(card_paths, serial, tmp_path):
    """A cache that holds about a third of what eight sessions store evicts while they run; every
    result is still the serial one, and the folder stays bounded."""
    classifiers = [load_classifier(p) for p in card_paths]
    cache = DiskCache(tmp_path / "small", size_limit_gb=150 * 2**10 / 2**30)  # 150 kB
    assert_identical(serial, run_threads(classifiers, cache))
    assert_identical(serial, run_threads(classifiers, cache))
    assert cache.volume() < 2 * 150 * 2**10


@pytest.mark.timeout(300)
def test_a_full_cache_evicts_the_oldest_and_keeps_answering(tmp_path):
    """Four threads store 600 entries of 40 kB (24 MB) into a 2 MB cache (about 50 entries): nothing
    raises, the volume stays near the limit, the 20 newest entries are all there, the oldest gone."""
    limit = 2 * 2**20
    cache = DiskCache(tmp_path / "c", size_limit_gb=limit / 2**30)
    entry = 40 * 2**10
    stored: list[tuple[str, int]] = []  # in the order the stores returned

    def writer(worker: int) -> None:
        for k in range(150):
            key, value = f"w{worker}-{k}", worker * 1000 + k
            cache.store(key, np.full(entry // 8, value, dtype=np.float64))
            stored.append((key, value))

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(writer, w) for w in range(4)]:
            future.result(timeout=WAIT_S)
    assert len(stored) == 600 and cache.volume() <= 1.5 * limit
    for key, value in stored[-20:]:
        found = cache.lookup(key)
        assert found is not MISSING and float(found[0]) == value, key
    assert all(cache.lookup(key) is MISSING for key, _ in stored[:100])
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 4 * limit  # values plus SQLite's own pages


@pytest.mark.timeout(300)
def test_truncated_value_files_are_recomputed_by_explain(tmp_path):
    """Truncate every value file of a filled cache: explain recomputes those entries and answers
    exactly as before (test_cache.py covers garbage and deleted files for a memoised function).
    A 96-pixel model, so that its attributions (2 × 96² floats) are big enough for files of their own."""
    card = tiny_card(("A", "B"), 96)
    classifier = load_classifier(save_checkpoint(tiny_resnet(num_classes=2, seed=2), card, tmp_path, "m"))
    reference = [run_session(i, [classifier, classifier], cache=None) for i in range(2)]
    cache = DiskCache(tmp_path / "c")
    for i in range(2):
        run_session(i, [classifier, classifier], cache)
    values = list((tmp_path / "c").rglob("*.val"))
    assert len(values) >= 4, "expected the attributions in files of their own"
    for path in values:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    assert_identical(reference, [run_session(i, [classifier, classifier], cache) for i in range(2)])


def test_a_damaged_cache_database_is_rebuilt_not_fatal(tmp_path):
    cache = DiskCache(tmp_path / "c")
    cache.store("k", np.arange(3))
    cache.close()
    database = tmp_path / "c" / "cache.db"
    database.write_bytes(b"this is not a SQLite database" * 100)
    reopened = DiskCache(tmp_path / "c")
    assert reopened.lookup("k") is MISSING
    reopened.store("k", np.arange(3))
    np.testing.assert_array_equal(reopened.lookup("k"), np.arange(3))
