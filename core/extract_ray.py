"""``extract`` on a Ray cluster: the same batches as the local engine, scored by a pool of Ray actors.

The work is ``core.extract``'s own: ``plan_batches`` cuts the plan into batches, each actor runs
``score_batch`` on them (the one scoring loop, ``core.pipeline.score_faces``, inside), and the driver
hands every finished batch to ``ExtractionRun.record``, which writes the relevance store and keeps
the score blocks, exactly as the local engine does. So the two engines write the same table, store
and cache entries.

What runs where: the driver (this process) plans, holds the store's lock and writes the store and
the score table; the actors (Ray Data ``map_batches`` over an actor pool: one actor per GPU with
``num_gpus=1``, else N CPU actors) receive the classifiers once, at start, through Ray's object
store, read the photos (and stored label maps, and the parser's model files) from the dataset's
path, and write cache entries into the cache folder. On a cluster of several machines that path
and the cache folder must be the same on every node (a shared filesystem), as must the project's
code (the workers import ``core``).

Resume: an actor that dies (a killed process, a lost node) is restarted and its batch retried by
Ray (``max_restarts``/``max_task_retries``); a batch that is retried, or a whole extraction that is
run again, looks every attribution up in the cache first (``cache.memoised_rows``), so only what is
missing is computed. Only this module imports Ray, and only ``core.cli`` with ``--engine ray``
imports this module.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pickle
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from cache import DiskCache
from core.errors import UserFacingError
from core.extract import (
    BatchResult,
    BatchWork,
    ExtractionPlan,
    ExtractionRun,
    check_request,
    score_batch,
)
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.rescore import Progress
from models.checkpoint import Classifier

RETRIES = 3  # restarts of a dead actor, and retries of the batch it held (a crash every time stops the run)
CONNECT_TIMEOUT_S = 10.0


class RayClusterError(UserFacingError):
    """The Ray cluster cannot be reached, or Ray is not installed."""


def extract_scores_ray(
    plan: ExtractionPlan,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
    store: RelevanceStore | None = None,
    progress: Progress | None = None,
    address: str | None = None,
    actors: int | None = None,
) -> pl.DataFrame:
    """``core.extract.extract_scores`` on Ray: the same table, store and cache entries.

    ``address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` of a cluster's head, or
    ``ray://HOST:PORT``; None: ``RAY_ADDRESS`` when set, else a Ray instance started here for this run.
    A Ray session already initialised in this process (``ray.init``) is used as it is. ``actors``:
    the pool's size; default one per GPU of the cluster, or one per CPU when it has none (with GPUs,
    at most one actor per GPU).
    """
    check_request(plan, settings)
    run = ExtractionRun(plan, settings, store, progress)
    with _ray_session(address) as ray:
        try:
            run.begin()
            for result in _scored_batches(ray, plan, settings, cache, run.batches, actors):
                run.record(result)
        finally:
            run.close()
    return run.table()


def pool_shape(resources: dict[str, float], actors: int | None) -> tuple[int, float, float]:
    """Actors, CPUs per actor and GPUs per actor for a cluster's total ``resources``."""
    if actors is not None and actors < 1:
        raise UserFacingError(f"--actors must be at least 1, not {actors}")
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        return min(actors or gpus, gpus), 1.0, 1.0
    size = actors or cpus
    return size, float(max(1, cpus // size)), 0.0


class _Scorer:
    """One actor of the pool: the classifiers arrive once, at construction; each call scores one batch.

    A ``UserFacingError`` of a batch comes back as the row's value (Ray would wrap it in its own
    exception), so the driver raises it as one clear line.
    """

    def __init__(self, classifiers: list, dataset, settings, cache_dir: str | None, work: list[BatchWork]):
        import ray
        import torch

        loaded: dict[str, Classifier] = ray.get(classifiers[0])
        device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        self.classifiers = {name: _on(c, device) for name, c in loaded.items()}
        self.dataset, self.settings, self.work = dataset, settings, work
        self.cache = None if cache_dir is None else DiskCache(cache_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        blobs = []
        for index in batch["index"]:
            work = self.work[int(index)]
            try:
                outcome: BatchResult | UserFacingError = score_batch(
                    self.dataset, self.classifiers[work.model], work, self.settings, self.cache
                )
            except UserFacingError as error:
                outcome = error
            blobs.append(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
        return {"index": np.asarray(batch["index"]), "result": np.array(blobs, dtype=object)}


def _scored_batches(
    ray: Any,
    plan: ExtractionPlan,
    settings: ExplainSettings,
    cache: DiskCache | None,
    work: list[BatchWork],
    actors: int | None,
) -> Iterator[BatchResult]:
    """Each batch's result as soon as an actor finishes it (any order)."""
    if not work:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller's progress() counts finished batches
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:  # its INFO and WARNING stay in Ray's log files
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    size, cpus, gpus = pool_shape(ray.cluster_resources(), actors)
    classifiers = ray.put({name: _on(c, None) for name, c in plan.classifiers.items()})
    items = ray.data.from_items([{"index": i} for i in range(len(work))], override_num_blocks=len(work))
    with warnings.catch_warnings():  # Ray 2.60 deprecates actor options here without a replacement yet
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", category=DeprecationWarning)
        scored = _scored(ray, items, size, cpus, gpus, classifiers, plan, settings, cache, work)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        for blob in batch["result"]:
            outcome = pickle.loads(blob)
            if isinstance(outcome, UserFacingError):
                raise outcome
            yield outcome


def _scored(
    ray: Any,
    items: Any,
    size: int,
    cpus: float,
    gpus: float,
    classifiers: Any,
    plan: ExtractionPlan,
    settings: ExplainSettings,
    cache: DiskCache | None,
    work: list[BatchWork],
) -> Any:
    """The lazy Ray dataset of scored batches: ``_Scorer`` over an actor pool, bounded restarts and retries
    (Ray Data's own default is to restart a crashing actor forever)."""
    return items.map_batches(
        _Scorer,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=cpus,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "classifiers": [classifiers],  # in a list: Ray passes the reference, the actor gets it once
            "dataset": plan.dataset,
            "settings": settings,
            "cache_dir": None if cache is None else str(cache.directory),
            "work": work,
        },
        # the actors import this project from where the driver has it (a shared filesystem on a cluster),
        # also in a Ray session that someone else started
        runtime_env={"env_vars": {"PYTHONPATH": _python_path()}},
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
    )


def _on(classifier: Classifier, device: Any) -> Classifier:
    """The classifier with its network on ``device`` (None: the CPU, to ship it to any node)."""
    import torch

    target = torch.device("cpu") if device is None else device
    if all(p.device == target for p in classifier.network.parameters()):
        return classifier
    return dataclasses.replace(classifier, network=copy.deepcopy(classifier.network).to(target))


_SESSION_LOCK = threading.Lock()
_session = {"users": 0, "owned": False}  # extractions in this process using Ray; did one of them start it


@contextmanager
def _ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: the session already initialised in this process, or a new one, shut down when the
    last extraction using it ends (a dashboard may run two at once, in two job threads)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayClusterError("the ray engine needs Ray: pip install -r requirements.txt (it pins ray[data])") from None
    with _SESSION_LOCK:
        if not ray.is_initialized():
            _connect(ray, address or os.environ.get("RAY_ADDRESS") or None)
            _session["owned"] = True
        _session["users"] += 1
    try:
        yield ray
    finally:
        with _SESSION_LOCK:
            _session["users"] -= 1
            if not _session["users"] and _session["owned"]:
                ray.shutdown()
                _session["owned"] = False


def _connect(ray: Any, address: str | None) -> None:
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = "on this machine (--address auto)" if address == "auto" else f"at {address}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RayClusterError(f"cannot connect to a Ray cluster {where}: {first}") from None


def _python_path() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]])


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, an address that is malformed or whose port does not answer
    (``ray.init`` itself would retry for minutes)."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayClusterError(f"cannot reach the Ray cluster at {address}: {reason}") from None
