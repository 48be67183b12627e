"""RQ1: does a region's relevance differ between a syndrome and the reference group (paper Table 3, Figure 6)?"""

from __future__ import annotations

import dataclasses
import io

import polars as pl
import streamlit as st

from core.errors import UserFacingError
from core.stats import (
    CORRECTIONS,
    TTESTS,
    compare_groups,
    domain_counts,
    in_domain,
    many_out_of_domain,
    significance_counts,
)
from dashboard import hosting, render, scores, state

SPLIT = "val"  # each fold model's own held-out images: every image once over the folds


def _frame_key(table: pl.DataFrame) -> int:
    return int(table.hash_rows().sum()) ^ hash(tuple(table.columns))


@st.cache_resource(
    show_spinner="Testing every method × syndrome × region …", max_entries=16, hash_funcs={pl.DataFrame: _frame_key}
)
def tests_of(
    table: pl.DataFrame,
    reference: str,
    alpha: float,
    correction: str,
    ttest: str,
    syndromes: tuple[str, ...] | None = None,
) -> pl.DataFrame:
    return compare_groups(
        table,
        reference=reference,
        alpha=alpha,
        correction=correction,
        ttest=ttest,
        syndromes=None if syndromes is None else list(syndromes),
    )


def profile_syndromes(view: state.View, table: pl.DataFrame, reference: str) -> tuple[str, ...] | None:
    """The syndromes the view's profile compares (and so corrects over); None: every label."""
    labels = table["label"].drop_nulls().unique().to_list()
    options = view.fidelity.rq1_options(labels, reference)
    missing = view.fidelity.missing_syndromes(labels)
    if missing:
        absent = render.markdown_escape(", ".join(missing))
        st.caption(f"Profile {view.profile}: the scores have no {absent}; the family is the rest.")
    return tuple(options["syndromes"]) if "syndromes" in options else None


def options(table: pl.DataFrame) -> dict:
    labels = sorted(table["label"].drop_nulls().unique().to_list())
    # The default first: a bound widget's default is its first option (no index, see dashboard.state).
    groups = ["Unaffected", *(g for g in labels if g != "Unaffected")] if "Unaffected" in labels else labels
    columns = st.columns(4)
    return {
        "reference": columns[0].selectbox(
            "Reference group",
            groups,
            key="reference",
            bind=state.URL,
            help="Each syndrome is compared with this group.",
        ),
        "alpha": columns[1].number_input(
            "α (after correction)",
            min_value=1e-6,
            max_value=0.5,
            value=0.001,
            step=0.001,
            format="%g",
            key="alpha",
            bind=state.URL,
        ),
        "correction": columns[2].selectbox(
            "Multiple-testing correction",
            CORRECTIONS,
            key="correction",
            bind=state.URL,
            help="Over the syndromes × regions tests of one method.",
        ),
        "ttest": columns[3].selectbox(
            "t-test variant",
            TTESTS,
            key="ttest",
            bind=state.URL,
            help="paper: pingouin's default the paper ran (Welch when the group sizes "
            "differ); student; welch. Used when both groups are normal with equal "
            "variances, else Mann–Whitney U.",
        ),
    }


def downloads(tests: pl.DataFrame, table: pl.DataFrame) -> None:
    parquet, score_parquet = io.BytesIO(), io.BytesIO()
    tests.write_parquet(parquet)
    table.write_parquet(score_parquet)
    columns = st.columns(3)
    columns[0].download_button("Tests (CSV)", tests.write_csv(), file_name="rq1-tests.csv", mime="text/csv")
    columns[1].download_button(
        "Tests (Parquet)", parquet.getvalue(), file_name="rq1-tests.parquet", mime="application/octet-stream"
    )
    columns[2].download_button(
        "Score table (Parquet)",
        score_parquet.getvalue(),
        file_name=f"scores-{SPLIT}.parquet",
        mime="application/octet-stream",
    )


def domain_filter(table: pl.DataFrame) -> pl.DataFrame:
    """The option to leave out faces the fold models' out-of-domain guards flagged (default: keep them,
    as the paper's tests do; README "Out-of-domain guard")."""
    flagged, judged = domain_counts(table)
    if not judged:
        return table
    exclude = st.checkbox(
        f"Exclude out-of-domain faces ({flagged} of {judged} flagged)",
        value=False,
        key="exclude_out_of_domain",
        bind=state.URL,
        help="Faces whose model's out-of-domain guard scored them past its threshold (99th percentile of "
        "its validation faces), i.e. unlike the faces it was trained on. Off by default: on the split the "
        "threshold was calibrated on, about 1% are flagged by design.",
    )
    if many_out_of_domain(flagged, judged):
        st.warning(
            f"{flagged} of {judged} faces are unlike their model's training faces (out of domain); their "
            "region scores may not mean much."
        )
    return in_domain(table) if exclude else table


def main() -> None:
    view = state.current()
    st.title("Statistics (RQ1)")
    st.caption(
        "Region scores of each syndrome against the reference group, per saliency method, on split "
        "'val' (each image scored once, by the fold model that held it out). Shapiro–Wilk and Levene "
        "decide between a t-test and Mann–Whitney U; Cohen's d; correction per method."
    )
    if view.dataset is None:
        st.info("Choose a dataset in the sidebar.")
        return
    try:
        source = scores.shown_score_table(view, SPLIT)
        if source is None:
            return
        source = dataclasses.replace(source, table=domain_filter(source.table))
        chosen = options(source.table)
        tests = tests_of(source.table, **chosen, syndromes=profile_syndromes(view, source.table, chosen["reference"]))
        show(tests, source.table, chosen)
    except UserFacingError as error:
        st.error(hosting.shown_error(error))


def show(tests: pl.DataFrame, table: pl.DataFrame, chosen: dict) -> None:
    methods = tests["method"].unique(maintain_order=True).to_list()
    st.subheader(f"Table 3: methods with a significant difference (of {len(methods)})")
    st.plotly_chart(
        render.heat_table(significance_counts(tests), "region", (0, len(methods)), title="methods"), width="stretch"
    )
    untested = tests.filter(pl.col("note").is_not_null())
    if len(untested):
        st.warning(f"{len(untested)} of {len(tests)} comparisons ran no test; their notes say why:")
        st.dataframe(
            untested.select("method", "syndrome", "region", "n_syndrome", "n_reference", "note"),
            hide_index=True,
            width="stretch",
            height=min(250, 40 + 35 * len(untested)),
        )
    st.subheader("Figure 6: region scores by group")
    shown = st.multiselect("Methods to plot", methods, default=methods[:2], key="figure_methods", bind=state.URL)
    for method in shown:
        st.markdown(f"**{method}**")
        st.plotly_chart(
            render.group_boxes(table.filter(pl.col("method") == method), chosen["reference"]), width="stretch"
        )
    st.subheader("Every test")
    st.dataframe(tests, hide_index=True, width="stretch")
    downloads(tests, hosting.with_image_ids(table))


main()
