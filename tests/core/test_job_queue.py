"""Extraction jobs (issue 13): limits, cancel, kills, versioned results that never narrow, the audit log."""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.dataset import names_in, open_dataset
from core.deployment import Limits
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.job_queue import (
    NICENESS,
    Job,
    JobError,
    JobQueue,
    JobRequest,
    Worker,
    prune_versions,
    publish_version,
    run_job,
    run_worker,
    staging_folder,
    worker_alive,
)
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings
from core.regions import PAPER_REGIONS
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import write_score_table
from models.checkpoint import save_checkpoint
from tests.conftest import REPO, tiny_card, tiny_resnet, tiny_synthetic_dataset

CLASSES = ("KS", "Unaffected", "WS")
SIZE = 64
KEY = ["model", "method", "image_name", "region"]
OLD, NEW = ("Gradient", "LayerGradCam"), "GuidedBackprop"


@pytest.fixture(scope="module")
def dataset_with_results(tmp_path_factory) -> Path:
    """18 faces of 3 classes, two fold models, and split val extracted (A, B) where ``extract`` writes it."""
    root = tmp_path_factory.mktemp("jobs") / "data"
    tiny_synthetic_dataset(root, CLASSES, n_per_class=6, test_fraction=0.34)
    cards = [
        save_checkpoint(
            tiny_resnet(num_classes=3, seed=f),
            tiny_card(CLASSES, SIZE, weights="w", fold=f"fold-{f}"),
            root / "models",
            f"classifier-fold-{f}",
        )
        for f in (1, 2)
    ]
    layout = DatasetLayout(root)
    table = extract_scores(
        ExtractionPlan(open_dataset(root), load_classifiers(cards), "val"),
        ExplainSettings(methods=OLD),
        store=RelevanceStore(layout.plain_relevance_store("val")),
    )
    write_score_table(table, layout.plain_score_table("val"))
    return root


@pytest.fixture
def dataset(dataset_with_results, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset_with_results, root)
    return root


def request(root: Path, methods=(NEW,), split="val", results_root: Path | None = None, **settings) -> JobRequest:
    return JobRequest.from_settings(
        ExplainSettings(methods=methods, **settings),
        dataset=str(root),
        dataset_id="tiny",
        split=split,
        cards=tuple(str(c) for c in DatasetLayout(root).classifier_cards()),
        results_root=None if results_root is None else str(results_root),
    )


def queue_in(folder: Path, **limits) -> JobQueue:
    return JobQueue(folder / "queue.sqlite", folder / "audit.jsonl", Limits(**limits))


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path -> content hash (what a reader of it can see)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def get(queue: JobQueue, job_id: int) -> Job:
    job = queue.get(job_id)
    assert job is not None
    return job


def claim(queue: JobQueue) -> Job:
    job = queue.claim()
    assert job is not None
    return job


def assert_added_as_extracted(table: pl.DataFrame, dataset: Path) -> None:
    """The job's rows of the new method equal a direct extraction of it on the same dataset."""
    cards = DatasetLayout(dataset).classifier_cards()
    direct = extract_scores(
        ExtractionPlan(open_dataset(dataset), load_classifiers(cards), "val"), ExplainSettings(methods=(NEW,))
    ).sort(KEY)
    added = table.filter(pl.col("method") == NEW).sort(KEY)
    assert added.select(KEY).equals(direct.select(KEY))
    np.testing.assert_allclose(added["score"].to_numpy(), direct["score"].to_numpy(), rtol=1e-5, atol=1e-8)


def audit(queue: JobQueue) -> list[dict]:
    return [json.loads(line) for line in queue.audit_log.read_text().splitlines()]


# ---------------------------------------------------------------- limits


def test_per_user_and_global_limits_with_the_refusal_message(dataset, tmp_path):
    queue = queue_in(tmp_path / "jobs", jobs_running=1, jobs_per_user=1)
    first = queue.submit(request(dataset), "alice@clinic.org")
    assert first.state == "queued" and queue.position(first) == 1
    # The same request again is the same job, not a second one (and no refusal).
    assert queue.submit(request(dataset), "alice@clinic.org").id == first.id
    with pytest.raises(
        JobError, match=r"you already have 1 extraction job\(s\) queued or running.*allows 1 per person"
    ):
        queue.submit(request(dataset, split="test"), "alice@clinic.org")
    other = queue.submit(request(dataset, split="test"), "bob@clinic.org")
    assert queue.position(other) == 2
    assert claim(queue).id == first.id
    assert queue.claim() is None  # one running job server-wide: bob's waits
    assert queue.position(get(queue, other.id)) == 1
    with pytest.raises(JobError, match="allows 1 per person"):  # running counts too
        queue.submit(request(dataset, methods=("Gradient",)), "alice@clinic.org")
    queue.finish(first.id, "done")
    assert claim(queue).id == other.id


def test_two_jobs_of_one_dataset_and_split_never_run_at_once(dataset, tmp_path):
    queue = queue_in(tmp_path / "jobs", jobs_running=4, jobs_per_user=4)
    a = queue.submit(request(dataset, methods=("Gradient",)), "a@x")
    b = queue.submit(request(dataset, methods=("LayerGradCam",)), "a@x")
    c = queue.submit(request(dataset, split="test"), "a@x")
    assert [claim(queue).id, claim(queue).id, queue.claim()] == [a.id, c.id, None]
    queue.finish(a.id, "done")
    assert claim(queue).id == b.id


def test_cancel_by_the_submitter_or_an_analyst_only(dataset, tmp_path):
    queue = queue_in(tmp_path / "jobs", jobs_per_user=2)
    job = queue.submit(request(dataset), "alice@x")
    with pytest.raises(JobError, match="only the person who submitted a job, or an analyst"):
        queue.cancel(job.id, "mallory@x")
    assert get(queue, job.id).state == "queued"
    cancelled = queue.cancel(job.id, "carol@x", analyst=True)
    assert cancelled.state == "cancelled" and cancelled.cancel_by == "carol@x"
    assert queue.claim() is None
    events = [(line["event"], line.get("outcome")) for line in audit(queue)]
    assert events == [("submitted", None), ("cancel requested", None), ("ended", "cancelled")]


def test_an_unwritable_queue_is_one_clear_line(dataset, tmp_path):
    (tmp_path / "jobs").write_text("a file where the queue's folder should be")
    queue = JobQueue(tmp_path / "jobs" / "queue.sqlite", tmp_path / "audit.jsonl")
    with pytest.raises(JobError, match="the job queue cannot be opened") as error:
        queue.submit(request(dataset), "a@x")
    assert str(tmp_path) not in str(error.value)


# ---------------------------------------------------------------- versions


def test_a_version_never_narrows_and_the_plain_results_stay_untouched(dataset, tmp_path):
    """Planted: the current results hold A and B; a job asking for C publishes A, B and C."""
    layout = DatasetLayout(dataset, tmp_path / "results")  # hosted: versions outside the dataset folder
    before = rescore(RelevanceStore(layout.plain_relevance_store("val")), PAPER_REGIONS, list(OLD))
    plain = digest(layout.results)  # (after re-scoring: that memoises the spec's masks in the store)
    queue = queue_in(tmp_path / "jobs")
    job = queue.submit(request(dataset, results_root=tmp_path / "results"), "alice@x")
    assert run_job(queue, claim(queue)) == 1
    assert get(queue, job.id).state == "done"
    current = layout.current_results("val")
    assert current.version == 1 and current.score_table.is_relative_to(tmp_path / "results")
    store = RelevanceStore(current.relevance_store)
    assert set(store.contents.methods) == {*OLD, NEW} and store.complete
    table = pl.read_parquet(current.score_table)
    assert set(table["method"]) == {*OLD, NEW}
    # A and B as the old store scores them; C as a direct extraction computes it.
    kept = table.filter(pl.col("method").is_in(list(OLD))).sort(KEY)
    np.testing.assert_allclose(kept["score"].to_numpy(), before.sort(KEY)["score"].to_numpy())
    assert_added_as_extracted(table, dataset)
    assert digest(layout.results) == plain  # the dataset's own results: not one byte changed
    assert not staging_folder(layout, "val", job.id).exists()
    # The audit log: who, what, when, the outcome; no photo, file or folder name.
    lines = audit(queue)
    assert [line["event"] for line in lines] == ["submitted", "started", "ended"]
    assert {(line["who"], line["dataset"], line["split"], tuple(line["methods"])) for line in lines} == {
        ("alice@x", "tiny", "val", (NEW,))
    }
    assert lines[-1]["outcome"] == "done" and lines[-1]["started"] <= lines[-1]["ended"]
    text = queue.audit_log.read_text()
    names = open_dataset(dataset).table["image_name"].to_list()
    assert not [n for n in names if Path(n).stem in text]
    assert str(dataset) not in text and "classifier-fold" not in text and str(tmp_path) not in text


def test_another_relevance_mode_recomputes_what_the_store_cannot_keep(dataset, tmp_path):
    """A store holds one relevance mode: a job in another mode re-extracts A and B too, so nothing is lost."""
    queue = queue_in(tmp_path / "jobs")
    queue.submit(request(dataset, mode="positive"), "alice@x")
    assert run_job(queue, claim(queue)) == 1
    current = DatasetLayout(dataset).current_results("val")
    store = RelevanceStore(current.relevance_store)
    assert store.contents.mode == "positive" and set(store.contents.methods) == {*OLD, NEW}
    assert set(pl.read_parquet(current.score_table)["method"]) == {*OLD, NEW}
    # Local mode: the version lives beside the plain files, and a later `extract` run wins again.
    assert current.score_table.is_relative_to(DatasetLayout(dataset).results / "versions")
    time.sleep(0.01)
    os.utime(DatasetLayout(dataset).plain_score_table("val"))
    assert DatasetLayout(dataset).current_results("val").version is None


def test_the_switch_is_atomic_for_readers(tmp_path):
    """A reader resolving the current results while versions are published sees one whole version each time."""
    layout = DatasetLayout(tmp_path / "data", tmp_path / "results")
    stop, seen, problems = threading.Event(), set(), []

    def read() -> None:
        while not stop.is_set():
            current = layout.current_results("val")
            if current.version is None:
                continue
            marker = pl.read_parquet(current.score_table)["method"].to_list()
            manifest = json.loads((current.relevance_store / "manifest.json").read_text())
            if marker != [f"v{manifest['number']}"]:
                problems.append((marker, manifest))
            seen.add(manifest["number"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for number in range(1, 41):
            staging = staging_folder(layout, "val", number)
            (staging / "relevance").mkdir(parents=True)
            pl.DataFrame({"method": [f"v{number}"]}).write_parquet(staging / "scores.parquet")
            (staging / "relevance" / "manifest.json").write_text(json.dumps({"number": number}))
            assert publish_version(layout, "val", staging, keep=1000) == number
    finally:
        stop.set()
        reader.join()
    assert not problems and len(seen) > 1


def test_pruning_keeps_the_newest_and_never_the_current(tmp_path):
    layout = DatasetLayout(tmp_path / "data", tmp_path / "results")
    for number in range(1, 6):
        staging = staging_folder(layout, "val", number)
        staging.mkdir(parents=True)
        publish_version(layout, "val", staging, keep=2)
    assert sorted(p.name for p in layout.versions("val").iterdir() if p.name.isdigit()) == ["4", "5"]
    layout.current_version_file("val").write_text("4\n")  # an admin rolled back
    staging = staging_folder(layout, "val", 6)
    staging.mkdir()
    os.rename(staging, layout.version("val", 6))
    assert prune_versions(layout, "val", keep=1) == [5]
    assert layout.current_version("val") == 4 and layout.version("val", 4).is_dir()


# ---------------------------------------------------------------- the worker: processes, cancel, kill


def slow_request(root: Path, results: Path, split: str = "all") -> JobRequest:
    """Long enough to cancel mid-run: SmoothGrad with many samples, one face per batch."""
    return request(
        root,
        methods=("SmoothGrad",),
        split=split,
        results_root=results,
        params={"SmoothGrad": {"n_iter": 40}},
        batch_size=1,
    )


def wait_for(condition, what: str, seconds: float = 300, worker: Worker | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if worker is not None:
            worker.step()
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child the worker has not reaped yet is a zombie: dead for our purpose.
    status = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status not in ("Z", "X")


@pytest.mark.slow
def test_cancel_and_kill_leave_the_current_version_whole(dataset, tmp_path):
    results = tmp_path / "results"
    layout = DatasetLayout(dataset, results)
    queue = queue_in(tmp_path / "jobs", jobs_running=1, jobs_per_user=2)
    worker = Worker(queue)
    try:
        # A first job publishes version 1 (A, B kept, C added) in its own process.
        first = queue.submit(request(dataset, results_root=results), "alice@x")
        wait_for(lambda: get(queue, first.id).state == "done", "the first job", worker=worker)
        assert layout.current_version("val") == 1
        published = digest(layout.versions("val"))
        expected = rescore(RelevanceStore(layout.current_results("val").relevance_store), PAPER_REGIONS)

        # Cancel mid-run: the worker kills the job's process; nothing of it becomes visible.
        slow = queue.submit(slow_request(dataset, results), "alice@x")
        running = wait_for(lambda: (j := get(queue, slow.id)).done > 0 and j, "progress", worker=worker)
        assert alive(running.pid) and staging_folder(layout, "all", slow.id).exists()
        # The job's own process, at a lower CPU priority than this one.
        assert os.getpriority(os.PRIO_PROCESS, running.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        queue.cancel(slow.id, "alice@x")
        ended = wait_for(lambda: (j := get(queue, slow.id)).state != "running" and j, "the cancel", worker=worker)
        assert ended.state == "cancelled" and not alive(running.pid)
        assert not staging_folder(layout, "all", slow.id).exists() and layout.current_version("all") is None

        # Killed from outside mid-run (a crash, an OOM kill): failed; the current version intact and readable.
        killed = queue.submit(slow_request(dataset, results, split="val"), "alice@x")
        running = wait_for(lambda: (j := get(queue, killed.id)).done > 0 and j, "progress", worker=worker)
        os.kill(running.pid, 9)
        ended = wait_for(lambda: (j := get(queue, killed.id)).state != "running" and j, "the kill", worker=worker)
        assert ended.state == "failed" and "exit code" in ended.error
        assert not staging_folder(layout, "val", killed.id).exists()
    finally:
        worker.stop()
    assert layout.current_version("val") == 1 and digest(layout.versions("val")) == published
    again = rescore(RelevanceStore(layout.current_results("val").relevance_store), PAPER_REGIONS)
    assert again.sort(KEY).equals(expected.sort(KEY))

    lines = audit(queue)
    ends = {line["job"]: line["outcome"] for line in lines if line["event"] == "ended"}
    assert ends == {first.id: "done", slow.id: "cancelled", killed.id: "failed"}
    first_lines = [line for line in lines if line["job"] == first.id]
    assert [line["event"] for line in first_lines] == ["submitted", "started", "ended"]
    assert first_lines[-1] | {"time": 0, "submitted": 0, "started": 0, "ended": 0} == {
        "time": 0,
        "event": "ended",
        "job": first.id,
        "who": "alice@x",
        "dataset": "tiny",
        "split": "val",
        "methods": [NEW],
        "mode": "abs",
        "profile": "project",
        "models": 2,
        "outcome": "done",
        "submitted": 0,
        "started": 0,
        "ended": 0,
    }
    # No file name, folder or photo content in the audit log.
    text = queue.audit_log.read_text()
    names = open_dataset(dataset).table["image_name"].to_list()
    assert not [n for n in names if n in text or Path(n).stem in text]
    assert str(dataset) not in text and "classifier-fold" not in text and str(tmp_path) not in text


def test_one_worker_per_queue(tmp_path):
    queue = queue_in(tmp_path / "jobs")
    assert not worker_alive(queue)
    started = threading.Thread(target=run_worker, args=(queue,), kwargs={"poll_s": 0.05, "idle_exit_s": 8.0})
    started.start()
    try:
        wait_for(lambda: worker_alive(queue), "the worker", seconds=10)
        assert run_worker(queue, idle_exit_s=0) == 0  # a second one gives way ...
        assert worker_alive(queue)  # ... to the first, which still serves
    finally:
        started.join()
    assert not worker_alive(queue)


def test_a_worker_starting_while_the_dashboard_probes_the_lock_still_serves(tmp_path, caplog):
    """``worker_alive`` holds the lock for an instant; a worker starting then must not mistake it for a worker.
    Planted: the lock held for 0.3 s (a slow probe) while the worker starts."""
    queue = queue_in(tmp_path / "jobs")
    queue.worker_lock.parent.mkdir(parents=True, exist_ok=True)
    with open(queue.worker_lock, "a") as probe:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.3, fcntl.flock, args=(probe, fcntl.LOCK_UN)).start()
        with caplog.at_level(logging.INFO, logger="core.job_queue"):
            assert run_worker(queue, poll_s=0.01, idle_exit_s=0) == 0
    assert "another worker serves this queue" not in caplog.text  # it waited for the probe, then served


@pytest.mark.slow
def test_a_job_runs_on_the_ray_engine_when_the_environment_says_so(dataset, tmp_path, monkeypatch):
    """``XAI_EXTRACT_ENGINE=ray`` in the job's environment: the batches go to Ray actors; the version is the
    same as the local engine's (against a direct local extraction)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    monkeypatch.setenv("XAI_EXTRACT_ENGINE", "ray")
    queue = queue_in(tmp_path / "jobs")
    queue.submit(request(dataset, results_root=tmp_path / "results"), "alice@x")
    try:
        assert run_job(queue, claim(queue)) == 1
    finally:
        if started:
            ray.shutdown()
    table = pl.read_parquet(DatasetLayout(dataset, tmp_path / "results").current_results("val").score_table)
    assert set(table["method"]) == {*OLD, NEW}
    assert_added_as_extracted(table, dataset)


@pytest.mark.slow
def test_the_worker_command_logs_no_photo_name_or_dataset_path_from_a_jobs_warnings(dataset, tmp_path):
    """A job's process is spawned without the server's log policy unless the worker hands it over: an
    extraction that leaves a broken photo out warns with the photo's path, which must reach DEBUG only."""
    names = open_dataset(dataset).table["image_name"].to_list()
    broken = names_in(open_dataset(dataset), "fold-1", "val")[0]
    (DatasetLayout(dataset).images / broken).write_bytes(b"not a picture")
    environment = {**os.environ, "XAI_CACHE_DIR": str(tmp_path / "cache" / "results")}
    environment.pop("XAI_DEPLOYMENT", None)
    jobs = tmp_path / "cache" / "jobs"  # local mode's queue: beside $XAI_CACHE_DIR (local_jobs_dir)
    queue = JobQueue(jobs / "queue.sqlite", jobs / "audit.jsonl")
    job = queue.submit(request(dataset), "someone")
    command = [sys.executable, "-m", "core", "worker", "--idle-exit", "1"]
    finished = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert get(queue, job.id).state == "done"
    for text in (finished.stderr, finished.stdout):
        assert str(dataset) not in text and [name for name in names if name in text] == []
    assert "UserWarning at" in finished.stderr  # the warning was raised in the job, and said without its text
