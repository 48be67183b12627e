"""Where a page's score table comes from, and the button that makes one when there is none.

In order: re-scored from the relevance store under the current region spec (fast, any spec);
else the Parquet table ``extract`` wrote (the spec it was extracted with); else nothing, and
``offer_extraction`` runs ``core.extract.extract_scores`` in a background job (``dashboard.jobs``)
that fills both for next time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import polars as pl
import streamlit as st

from cache import DiskCache
from core.dataset import Dataset
from core.errors import UserFacingError
from core.extract import ExtractionPlan, extract_scores
from core.regions import RegionSpec
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import write_score_table
from dashboard import hosting, jobs, render, resources, state

ENGINE_ENV, RAY_ADDRESS_ENV = "XAI_EXTRACT_ENGINE", "XAI_RAY_ADDRESS"


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


@st.cache_data(show_spinner="Re-scoring from the stored relevance maps …", max_entries=16)
def _rescored(folder: str, version: float, spec_json: str, methods: tuple[str, ...]) -> pl.DataFrame:
    return rescore(_store(folder, version), RegionSpec.from_json(spec_json), list(methods))


@st.cache_data(show_spinner="Reading the score table …", max_entries=4)
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
    folder = view.dataset.layout.relevance_store(split)
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
            stale = methods if contents.mode != wanted.mode else tuple(other)
            return Scores(
                table,
                ScoreSource.STORE,
                caveats,
                _lacking(view, contents.methods),
                time.perf_counter() - started,
                stale,
            )
    path = view.dataset.layout.score_table(split)
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


def _job_key(dataset: Dataset, split: str) -> str:
    return f"extract {dataset.root.resolve()} {split}"


def _extraction(view: state.View, dataset: Dataset, split: str):
    """The work of one extraction, with every model loaded here, on the script thread."""
    classifiers = {Path(card).stem: resources.classifier(card) for card in view.cards}
    plan, settings, layout = ExtractionPlan(dataset, classifiers, split), view.settings(split=split), dataset.layout

    def work(job: jobs.Job) -> None:
        cache = DiskCache(resources.result_cache().directory)
        store = RelevanceStore(layout.relevance_store(split))
        if extraction_engine() == "ray":  # only then is Ray imported
            from core.extract_ray import extract_scores_ray

            address = os.environ.get(RAY_ADDRESS_ENV) or None
            table = extract_scores_ray(plan, settings, cache, store, job.report, address=address)
        else:
            table = extract_scores(plan, settings, cache=cache, store=store, progress=job.report)
        write_score_table(table, layout.score_table(split))

    return work


def extraction_engine() -> str:
    """``XAI_EXTRACT_ENGINE``: ``local`` (default: this server's CPU or GPU) or ``ray`` (the cluster at
    ``XAI_RAY_ADDRESS``; README, "Extraction on a Ray cluster")."""
    engine = (os.environ.get(ENGINE_ENV) or "local").strip().lower()
    if engine not in ("local", "ray"):
        raise UserFacingError(f"{ENGINE_ENV} must be local or ray, not {engine!r}")
    return engine


@st.fragment(run_every=1.0)
def _follow(key: str) -> None:
    """Redraws itself every second while the job runs; reruns the whole page once it ends."""
    job = jobs.board().get(key)
    if job is None or job.finished:
        st.rerun(scope="app")
    st.progress(job.fraction, text=job.status())


def offer_extraction(view: state.View, split: str, missing: bool) -> bool:
    """The extraction button and progress for ``split``; True while a job runs (the page should wait).

    ``missing``: there is no score table at all (a prominent offer) rather than only some methods."""
    dataset = view.dataset
    if dataset is None:
        return False
    key = _job_key(dataset, split)
    job = jobs.board().get(key)
    if job is not None and not job.finished:
        _follow(key)
        return True
    if job is not None and job.error:
        st.error(render.markdown_escape(f"The extraction failed: {hosting.redact(job.error)}"))
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
        f"Runs {len(view.methods)} method(s) over the {split} images of {len(view.cards)} fold model(s) in "
        "the background (other pages stay usable; the same as `python -m core extract`), and keeps the "
        "relevance maps so that region edits re-score without any model."
    )
    if st.button(label, key=f"extract-{split}", type="primary" if missing else "secondary", help=help_text):
        try:
            work = _extraction(view, dataset, split)
        except UserFacingError as error:
            st.error(render.markdown_escape(hosting.redact(str(error))))
            return False
        jobs.board().start(key, f"extracting split {split}", work)
        st.rerun()
    return False
