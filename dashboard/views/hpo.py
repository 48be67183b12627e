"""RQ2: do region scores follow the HPO terms raters marked in that region (paper Table 4, Figure 4)?"""

from __future__ import annotations

from typing import cast

import polars as pl
import streamlit as st

from core.dataset import Dataset
from core.errors import UserFacingError
from core.hpo import term_syndrome_chi2, term_tsne
from core.stats import hpo_correlation, table4_wide
from dashboard import hosting, render, resources, scores, state

SPLIT = "test"  # the HPO-annotated test images; every fold model scores them


@st.cache_resource(show_spinner="Running t-SNE on the annotations …", max_entries=4)
def tsne_of(
    root: str,
    version: tuple[float, ...],
    perplexity: float = 30.0,
    init: str = "pca",
    method: str = "auto",
    keep_unlisted: bool = False,
) -> pl.DataFrame:
    annotations = resources.annotations(resources.dataset(root), keep_unlisted)
    return term_tsne(annotations, perplexity=perplexity, init=init, method=method)


@st.cache_resource(show_spinner=False, max_entries=4)
def chi2_of(
    root: str, version: tuple[float, ...], statistic: str = "contingency", keep_unlisted: bool = False
) -> pl.DataFrame:
    return term_syndrome_chi2(resources.annotations(resources.dataset(root), keep_unlisted), statistic=statistic)


def correlation(view: state.View, counts: pl.DataFrame) -> None:
    source = scores.shown_score_table(view, SPLIT)
    if source is None:
        return
    result = hpo_correlation(source.table, counts)
    summary = result.summary
    models = int(cast(int, summary["n_models"].max())) if len(summary) else 0  # an integer column
    st.subheader(f"Table 4: Spearman ρ between C_i and the region's HPO count, mean (std) over {models} fold model(s)")
    st.plotly_chart(
        render.heat_table(
            summary.pivot(on="region", index="method", values="rho_mean", maintain_order=True),
            "method",
            (-1, 1),
            text=table4_wide(summary),
            title="mean ρ",
        ),
        width="stretch",
    )
    with st.expander("Per fold model"):
        st.dataframe(result.per_model, hide_index=True, width="stretch")
    st.subheader("C_i against the HPO count")
    left, right = st.columns(2)
    methods = summary["method"].unique(maintain_order=True).to_list()
    regions = summary["region"].unique(maintain_order=True).to_list()
    method = left.selectbox("Method", methods, key="scatter_method", bind=state.URL)
    region = right.selectbox("Region", regions, key="scatter_region", bind=state.URL)
    points = source.table.filter((pl.col("method") == method) & (pl.col("region") == region)).join(
        counts.filter(pl.col("region") == region).select("image_name", "count"), on="image_name"
    )
    st.plotly_chart(render.count_scatter(hosting.with_image_ids(points), region), width="stretch")


def figure4(dataset: Dataset, view: state.View) -> None:
    version = resources.annotations_version(dataset)
    statistic = view.fidelity.chi2_options()["statistic"]
    tsne = view.fidelity.tsne_options()
    keep = view.fidelity.figure4_keep_unlisted
    st.subheader("Figure 4: the annotations themselves")
    if keep and resources.annotation_note(dataset):
        note = resources.annotation_note(dataset, keep_unlisted=True)
        st.caption(render.markdown_escape(f"Profile {view.profile}: {note}"))
    left, right = st.columns(2)
    with left:
        st.markdown(f"**χ² of each term against the syndrome label** ({statistic})")
        st.plotly_chart(render.chi2_bars(chi2_of(str(dataset.root), version, statistic, keep)), width="stretch")
    with right:
        st.markdown(
            "**t-SNE of the per-image term vectors** ("
            + ", ".join(f"{key} {value}" for key, value in tsne.items())
            + ")"
        )
        st.plotly_chart(
            render.tsne_scatter(
                hosting.with_image_ids(tsne_of(str(dataset.root), version, **tsne, keep_unlisted=keep))
            ),
            width="stretch",
        )


def leaderboard(dataset: Dataset) -> None:
    if not dataset.layout.ground_truth.is_file():
        return
    st.subheader("Ground truth leaderboard (synthetic data)")
    st.caption(
        "How often each method puts most relevance on the region where the phenotype was planted "
        "(single-region faces; chance 1/regions), and ρ between planted-term counts and C_i."
    )
    path = dataset.layout.leaderboard
    if path.is_file():
        st.dataframe(pl.read_csv(path), hide_index=True, width="stretch")
    elif hosting.deployment() is not None:  # the command names server paths: the admin runs it
        st.info("No leaderboard for this dataset yet.")
    else:
        st.info(render.markdown_escape(f"No leaderboard yet ({path} is missing). Make it with:"))
        st.code(f"python -m core benchmark {dataset.root} --methods all", language="bash")


def main() -> None:
    view = state.current()
    st.title("HPO correlation (RQ2)")
    st.caption(
        "Do methods put more relevance on a region when raters marked more HPO terms there? Split 'test': "
        "the annotated test images, scored by every fold model."
    )
    dataset = view.dataset
    if dataset is None:
        st.info("Choose a dataset in the sidebar.")
        return
    try:
        try:
            counts = resources.hpo_region_counts(dataset, **view.fidelity.region_count_options())
        except UserFacingError as error:
            st.info(
                render.markdown_escape(
                    f"This dataset has no HPO annotations, so RQ2 cannot be computed: {hosting.redact(str(error))}"
                )
            )
        else:
            note = resources.annotation_note(dataset)
            if note:
                st.warning(render.markdown_escape(note))
            correlation(view, counts)
            figure4(dataset, view)
        leaderboard(dataset)
    except UserFacingError as error:
        st.error(hosting.shown_error(error))


main()
