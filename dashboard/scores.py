"""Where a page's score table comes from, and the button that makes one when there is none.

In order: re-scored from the relevance store under the current region spec (fast, any spec);
else the Parquet table ``extract`` wrote (the spec it was extracted with); else nothing, and
``offer_extraction`` submits an extraction job (``dashboard.jobs``, ``core.job_queue``): a worker
process writes a new result version, and readers switch to it only once it is complete. Store and
table come from ``DatasetLayout.current_results``, resolved once per read: a page never mixes versions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import polars as pl
import streamlit as st

from core.devices import precision_tag, resolve_device
from core.errors import UserFacingError
from core.job_queue import Job, JobError, JobRequest, dataset_token
from core.layout import DatasetLayout
from core.regions import RegionSpec
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from dashboard import hosting, jobs, render, resources, state


class ScoreSource(Enum):
    """Where a score table came from; pages branch on this, never on the text of a note."""

    STORE = "store"  # re-scored from the relevance store under the current region spec
    TABLE = "table"  # the Parquet table ``extract`` wrote, scored with the spec it was extracted with


@dataclass(frozen=True)
class Scores:
    table: pl.DataFrame
    origin: ScoreSource
    caveats: tuple[str, ...]  # what the reader should know about how these scores were made
    unextracted: tuple[str, ...]  # chosen methods without scores here: an extraction would add them
    seconds: float  # how long getting the table took on this run
    stale: tuple[str, ...] = ()  # methods whose stored maps were made under other settings (mode, profile)

    @property
    def note(self) -> str | None:
        """The caveats and the methods not extracted yet, as one line for a caption."""
        lacking = (f"not extracted yet: {', '.join(self.unextracted)}",) if self.unextracted else ()
        return "; ".join((*self.caveats, *lacking)) or None


def _lacking(view: state.View, present) -> tuple[str, ...]:
    return tuple(m for m in view.methods if m not in present)


def _version(folder: Path) -> float:
    """Changes whenever an extraction writes into the store (its journal and manifest)."""
    return max(resources.modified(folder / "journal.jsonl"), resources.modified(folder / "manifest.json"))


@st.cache_resource(show_spinner=False, max_entries=4)
def _store(folder: str, version: float) -> RelevanceStore:
    """One store object per folder and version: it memoises each spec's masks in memory."""
    return RelevanceStore(folder)


@st.cache_resource(show_spinner="Re-scoring from the stored relevance maps …", max_entries=16)
def _rescored(folder: str, version: float, spec_json: str, methods: tuple[str, ...]) -> pl.DataFrame:
    return rescore(_store(folder, version), RegionSpec.from_json(spec_json), list(methods))


@st.cache_resource(show_spinner="Reading the score table …", max_entries=4)
def _read_table(path: str, modified: float) -> pl.DataFrame:
    return pl.read_parquet(path)


def shown_score_table(view: state.View, split: str) -> Scores | None:
    """``score_table`` with what the reader must know about it shown; None, with a way to make one, if empty."""
    if view.dataset is None:
        return None
    source = score_table(view, split)
    if source is None:
        st.info(render.markdown_escape(f"No region scores for split {split!r} of {hosting.dataset_label(view)} yet."))
        offer_extraction(view, split, missing=True)
        return None
    if source.note:
        st.caption(render.markdown_escape(f"Scores: {source.note}."))
    if source.unextracted or source.stale:
        offer_extraction(view, split, missing=False)
    if source.table.is_empty():
        st.info("None of the chosen methods has scores; choose methods in the sidebar or extract them.")
        return None
    return source


def score_table(view: state.View, split: str) -> Scores | None:
    """The view's methods on ``split`` ("val": RQ1, "test": RQ2), or None when nothing was extracted."""
    if view.dataset is None:
        return None
    started = time.perf_counter()
    current = results_layout(view).current_results(split)  # one version for the store and the table
    folder = current.relevance_store
    store = _store(str(folder), _version(folder)) if folder.is_dir() else None
    if store is not None and store.exists and store.complete:
        contents = store.contents
        methods = tuple(m for m in view.methods if m in contents.methods)
        if methods:
            table = _rescored(str(folder), _version(folder), view.spec.to_json(), methods)
            wanted = view.settings(split=split)
            caveats: tuple[str, ...] = (
                ()
                if contents.mode == wanted.mode
                else (f"the stored maps use relevance mode {contents.mode!r}, not {wanted.mode!r}",)
            )
            other = [m for m in methods if contents.method_params.get(m) != wanted.method_params(m)]
            if other:
                caveats += (
                    f"the stored maps of {', '.join(other)} were made with other method settings than the "
                    f"{view.profile} profile's (extract again to replace them)",
                )
            # Maps computed on another device or precision (a GPU's SmoothGrad noise and rounding are its own).
            here = precision_tag(resolve_device(resources.device()))
            elsewhere = contents.computed_elsewhere(here)
            if elsewhere:
                where = ", ".join(sorted({m.device or "cpu/float32" for m in elsewhere}))
                caveats += (
                    f"the stored maps were computed on {where}, not on this dashboard's {here} (extract again "
                    "to replace them)",
                )
            stale = methods if contents.mode != wanted.mode or elsewhere else tuple(other)
            return Scores(
                table,
                ScoreSource.STORE,
                caveats,
                _lacking(view, contents.methods),
                time.perf_counter() - started,
                stale,
            )
    path = current.score_table
    if path.is_file():
        table = _read_table(str(path), resources.modified(path))
        caveat = (
            f"read from {path.name}, scored with the region spec it was extracted with (re-scoring under "
            "another spec needs the relevance store, which the extraction below fills)"
        )
        return Scores(
            table.filter(pl.col("method").is_in(list(view.methods))),
            ScoreSource.TABLE,
            (caveat,),
            _lacking(view, set(table["method"].unique().to_list())),
            time.perf_counter() - started,
        )
    return None


def results_layout(view: state.View) -> DatasetLayout:
    """The view's dataset layout with where its jobs write: hosted mode, the deployment's results folder of the
    dataset (its own folder may be read-only); local mode, the dataset's ``results/``."""
    assert view.dataset is not None
    current = hosting.deployment()
    if current is not None and view.dataset_id:
        return DatasetLayout(view.dataset.root, current.results(view.dataset_id))
    return view.dataset.layout


def _dataset_id(view: state.View) -> str:
    """The dataset's id in hosted mode; locally an opaque token of its folder (the audit log names no folder)."""
    if hosting.deployment() is not None and view.dataset_id:
        return view.dataset_id
    assert view.dataset is not None
    return dataset_token(view.dataset.root)


def _request(view: state.View, split: str) -> JobRequest:
    """What the worker needs to run the view's extraction of ``split``: plain data, no loaded model."""
    assert view.dataset is not None
    current = hosting.deployment()
    dataset_id = _dataset_id(view)
    return JobRequest.from_settings(
        view.settings(split=split),
        dataset=str(view.dataset.root),
        dataset_id=dataset_id,
        split=split,
        cards=tuple(view.cards),
        profile=view.profile,
        parser=view.parser or None,
        results_root=None if current is None else str(current.results(dataset_id)),
        cache_dir=str(resources.result_cache().directory),
    )


def _failure(job: Job) -> str:
    """A failed job's message; in hosted mode without server paths, and its text only for an analyst (it may
    name a photo)."""
    if hosting.deployment() is not None and not hosting.may("analyst"):
        return "The last extraction failed; an analyst can see why and run it again."
    return render.markdown_escape(f"The extraction failed: {hosting.redact(job.error or '')}")


@st.fragment(run_every=1.0)
def _follow(job_id: int) -> None:
    """Redraws itself every second while the job is queued or runs; reruns the whole page once it ends."""
    queue = jobs.queue()
    job = queue.get(job_id)
    if job is None or not job.active:
        st.rerun(scope="app")
        return
    jobs.ensure_worker(queue)  # a worker that stopped (or a restarted server) is replaced
    by = f", submitted by {job.submitter}"
    if job.state == "queued":
        ahead = queue.position(job) - 1
        place = "next to start" if ahead == 0 else f"{ahead} job(s) ahead of it"
        st.progress(0.0, text=render.markdown_escape(f"{job.status()}: {place}{by}"))
    else:
        st.progress(job.fraction, text=render.markdown_escape(job.status() + by))
    if jobs.may_cancel(job) and st.button(
        "Cancel", key=f"cancel-job-{job.id}", help="Stops the job; the results pages read now stay as they are."
    ):
        try:
            queue.cancel(job.id, jobs.who(), analyst=hosting.may("analyst"))
        except JobError as error:
            st.error(render.markdown_escape(str(error)))
            return
        st.rerun(scope="app")


def offer_extraction(view: state.View, split: str, missing: bool) -> bool:
    """The extraction button and progress for ``split``; True while a job runs (the page should wait).

    ``missing``: there is no score table at all (a prominent offer) rather than only some methods."""
    dataset = view.dataset
    if dataset is None:
        return False
    try:
        queue = jobs.queue()
        job = queue.latest(f"{_dataset_id(view)} {split}")
    except JobError as error:
        st.warning(render.markdown_escape(f"Extraction jobs are unavailable here: {error}"))
        return False
    if job is not None and job.active:
        _follow(job.id)
        return True
    if job is not None and job.state == "failed" and job.error:
        st.error(_failure(job))
    if not view.cards:
        if missing and hosting.deployment() is not None:
            st.info(f"No score table for split {split!r} and no fold model to make one with.")
        elif missing:
            st.info(
                f"No score table for split {split!r} and no fold models in "
                f"{render.markdown_escape(dataset.root / 'models')} to make one: run "
                f"`python -m core extract {str(dataset.root).replace('`', '')} --split {split} --models CARD,…`."
            )
        return False
    if not hosting.may("analyst"):  # hosted mode: a viewer reads tables, an analyst makes them
        if missing:
            st.caption("Extracting region scores needs the analyst role.")
        return False
    label = (
        f"Extract region scores of split {split!r}"
        if missing
        else f"Extract {', '.join(view.methods)} for split {split!r} again (adds missing methods)"
    )
    help_text = (
        f"Runs {len(view.methods)} method(s) over the {split} images of {len(view.cards)} fold model(s) in a "
        "worker process (other pages stay usable; the same as `python -m core extract`), and keeps the "
        "relevance maps so that region edits re-score without any model. Pages switch to the new results only "
        "when the job is complete, and keep every method they had."
    )
    if st.button(label, key=f"extract-{split}", type="primary" if missing else "secondary", help=help_text):
        hosting.require("analyst")  # the check that counts: a viewer's crafted click never queues a job
        try:
            queue.submit(_request(view, split), jobs.who())
        except UserFacingError as error:  # a limit (JobError), or settings that cannot be used
            st.error(hosting.shown_error(error))
            return False
        jobs.ensure_worker(queue)
        st.rerun()
    return False
