"""Edit the region spec live: parts per region, box growth, overlap order, added regions, gap splits.

The page keeps a draft (the ``RegionSpec`` in use) in the session. Every change goes through a widget
callback, so it is applied before the sidebar draws: a ``core.region_edits`` function makes the new
spec, which is saved in the spec store, and its content id becomes the URL's ``spec`` for every page.
An edit the spec refuses is shown with its message and the last valid spec stays in use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from core import region_edits
from core.dataset import Dataset, names_in
from core.errors import UserFacingError
from core.parse import LAPA_LABELS
from core.pipeline import prepare_dataset_faces
from core.regions import RegionRule, RegionSpec, check_caps
from core.stats import compare_groups, hpo_correlation, significance_counts, table4_wide
from dashboard import hosting, render, resources, scores, state

DRAFT, SOURCE, GENERATION, NOTICE = "_draft", "_draft_source", "_draft_generation", "_draft_notice"
GROWTH = (-0.5, 1.5)


@dataclass(frozen=True)
class Notice:
    """What the page tells about the last edit or import; ``refused`` says it was not applied."""

    text: str
    refused: bool


def _key(*parts) -> str:
    """Widget keys carry a generation: a structural edit (order, add, remove) starts fresh widgets."""
    return "-".join(map(str, ("rg", st.session_state.get(GENERATION, 0), *parts)))


def _fresh_widgets() -> None:
    """New keys, so every widget shows the draft again rather than the value it kept."""
    st.session_state[GENERATION] = st.session_state.get(GENERATION, 0) + 1


def _load_draft(spec: RegionSpec, reference: str) -> None:
    st.session_state[DRAFT] = spec
    st.session_state[SOURCE] = reference
    _fresh_widgets()
    st.session_state.pop(NOTICE, None)


def _commit(spec: RegionSpec, structural: bool, note: str | None = None) -> None:
    """Store the edited spec and make it the draft and the view's spec (hosted mode: analysts only)."""
    if not hosting.may("analyst"):
        st.session_state[NOTICE] = Notice("Not saved: editing shared specs needs the analyst role.", refused=True)
        return
    named = region_edits.without_bundled_name(spec)
    try:
        reference = resources.spec_store().reference(named)  # within the caps (``_edited`` checked the edit)
    except UserFacingError as error:
        st.session_state[NOTICE] = Notice(f"Not saved: {error}", refused=True)
        _fresh_widgets()
        return
    state.use_spec(reference)
    st.session_state[DRAFT] = named
    st.session_state[SOURCE] = reference
    st.session_state[NOTICE] = Notice(note, refused=False) if note else None
    if structural or named.name != spec.name:  # the name field shows the new name
        _fresh_widgets()


def _edited(edit: Callable, *args):
    """``edit(draft, *args)``, or None with the refusal shown: the last valid spec stays in use, and the
    widgets show it again rather than the refused value. An edit past the server's caps (regions, name
    length, bytes: ``Limits``) is refused like any other."""
    try:
        edited = edit(st.session_state[DRAFT], *args)
        check_caps(edited[0] if isinstance(edited, tuple) else edited, resources.spec_store().caps)
        return edited
    except UserFacingError as error:
        st.session_state[NOTICE] = Notice(f"Not applied: {error}", refused=True)
        _fresh_widgets()
        return None


def _edit(edit: Callable[..., RegionSpec], *args) -> None:
    """Callback of a button: a structural edit (order, add, remove) of the draft."""
    spec = _edited(edit, *args)
    if spec is not None:
        _commit(spec, structural=True)


def _set(edit: Callable[..., RegionSpec], key: str, *args) -> None:
    """Callback of a value widget: ``edit(draft, *args, the widget's value)``; the widget already shows it."""
    spec = _edited(edit, *args, st.session_state[key])
    if spec is not None:
        _commit(spec, structural=False)


def _remove_region(index: int) -> None:
    edited = _edited(region_edits.remove_region, index)
    if edited is not None:
        spec, dropped = edited
        name = st.session_state[DRAFT].regions[index].name
        _commit(
            spec,
            structural=True,
            note=f"Removed {name!r}" + (f" and what pointed at it: {', '.join(dropped)}." if dropped else "."),
        )


def _add_template(key: str) -> None:
    templates = region_edits.region_templates(st.session_state[DRAFT])
    template = next(rule for rule in templates if rule.name == st.session_state[key])
    _edit(region_edits.add_region, template)


def _add_split(upper_key: str, lower_key: str) -> None:
    _edit(region_edits.add_split, st.session_state[upper_key], st.session_state[lower_key])


def _import(key: str) -> None:
    upload = st.session_state.get(key)
    if upload is None:
        return
    if not hosting.may("analyst"):
        st.session_state[NOTICE] = Notice("Not imported: saving shared specs needs the analyst role.", refused=True)
        return
    try:  # measured against the caps before it is decoded or parsed
        spec = RegionSpec.from_json(upload.getvalue(), caps=resources.spec_store().caps)
    except UserFacingError as error:
        st.session_state[NOTICE] = Notice(f"Not imported: {error}", refused=True)
        return
    reference = resources.spec_store().reference(spec)
    state.use_spec(reference)
    _load_draft(spec, reference)


def _label_name(label: int) -> str:
    return f"{label} {LAPA_LABELS[label]}"


def edit_region(index: int, region: RegionRule, count: int) -> None:
    with st.container(border=True):
        title, up, down, remove = st.columns([6, 1, 1, 1], vertical_alignment="center")
        kind = "boxes around parts" if region.boxes else "pixels of labels"
        title.markdown(f"**{index + 1}. {render.markdown_escape(region.name)}** · {kind}")
        up.button(
            ":material/arrow_upward:",
            key=_key("up", index),
            disabled=index == 0,
            on_click=_edit,
            args=(region_edits.move_region, index, -1),
            help="Move up: earlier regions win where two overlap",
        )
        down.button(
            ":material/arrow_downward:",
            key=_key("down", index),
            disabled=index == count - 1,
            on_click=_edit,
            args=(region_edits.move_region, index, 1),
            help="Move down",
        )
        remove.button(
            ":material/delete:",
            key=_key("remove", index),
            on_click=_remove_region,
            args=(index,),
            help=f"Remove {render.markdown_escape(region.name)}",
        )
        for b, box in enumerate(region.boxes):
            labels, remove_box = st.columns([8, 1], vertical_alignment="bottom")
            key = _key("labels", index, b)
            labels.multiselect(
                f"Box {b + 1} around",
                list(range(len(LAPA_LABELS))),
                default=list(box.labels),
                format_func=_label_name,
                key=key,
                on_change=_set,
                args=(region_edits.set_box_labels, key, index, b),
            )
            remove_box.button(
                ":material/delete:",
                key=_key("remove-box", index, b),
                on_click=_edit,
                args=(region_edits.remove_box, index, b),
                disabled=len(region.boxes) == 1,
                help="Remove this box",
            )
            for column, side in zip(st.columns(4), region_edits.GROW_SIDES):
                key = _key(side, index, b)
                column.slider(
                    f"grow {side.removeprefix('grow_')}",
                    *GROWTH,
                    value=float(getattr(box, side)),
                    step=0.05,
                    key=key,
                    on_change=_set,
                    args=(region_edits.set_box_growth, key, index, b, side),
                    help="Fraction of the part's box size added on this side (negative shrinks)",
                )
        if region.boxes:
            st.button("Add a box", key=_key("add-box", index), on_click=_edit, args=(region_edits.add_box, index))
        else:
            key = _key("pixels", index)
            st.multiselect(
                "Pixels of",
                list(range(len(LAPA_LABELS))),
                default=list(region.labels),
                format_func=_label_name,
                key=key,
                on_change=_set,
                args=(region_edits.set_pixel_labels, key, index),
            )
        for edge, link in region.links():
            key = _key("offset", index, edge)
            st.number_input(
                f"{edge} edge at {render.markdown_escape(link.region)}'s {link.edge} edge, plus × its size",
                value=float(link.offset),
                step=0.05,
                key=key,
                on_change=_set,
                args=(region_edits.set_link_offset, key, index, edge),
            )


def edit_spec(draft: RegionSpec) -> None:
    key = _key("name")
    st.text_input(
        "Spec name",
        value=draft.name,
        key=key,
        on_change=_set,
        args=(region_edits.rename, key),
        max_chars=resources.spec_store().caps.name_chars,  # the browser's bound; _edited checks it again
    )
    for index, region in enumerate(draft.regions):
        edit_region(index, region, len(draft.regions))
    templates = [rule.name for rule in region_edits.region_templates(draft)]
    if templates:
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        key = _key("template")
        left.selectbox(f"Add a region (templates from {region_edits.TEMPLATE_SPEC}.json)", templates, key=key)
        right.button("Add", key=_key("add-region"), on_click=_add_template, args=(key,))
    st.markdown("**Gap splits** (the paper's nose/mouth rule: facing edges meet at the gap's midpoint)")
    for s, split in enumerate(draft.gap_splits):
        left, right = st.columns([5, 1], vertical_alignment="bottom")
        key = _key("extend", s)
        left.slider(
            f"{render.markdown_escape(split.upper)} / {render.markdown_escape(split.lower)}: extend "
            f"{render.markdown_escape(split.lower)}'s bottom by × the gap",
            0.0,
            2.0,
            value=float(split.extend_lower_bottom),
            step=0.05,
            key=key,
            on_change=_set,
            args=(region_edits.set_split_extension, key, s),
        )
        right.button(
            ":material/delete:",
            key=_key("remove-split", s),
            on_click=_edit,
            args=(region_edits.remove_split, s),
            help="Remove this split",
        )
    names = [rule.name for rule in draft.regions]
    if len(names) >= 2:
        upper, lower, add = st.columns([2, 2, 1], vertical_alignment="bottom")
        upper_key, lower_key = _key("split-upper"), _key("split-lower")
        upper.selectbox("Upper region", names, key=upper_key)
        lower.selectbox("Lower region", names, index=1, key=lower_key)
        add.button("Add split", key=_key("add-split"), on_click=_add_split, args=(upper_key, lower_key))


def preview(view: state.View, dataset: Dataset) -> None:
    """The current spec's masks on a few held-out faces."""
    count = st.slider("Faces to preview", 1, 8, 4, key="preview", bind=state.URL)
    fold = dataset.folds[0] if dataset.folds else None
    held_out = names_in(dataset, fold, "test") if fold else dataset.table["image_name"].to_list()
    labels = dataset.labels
    first_of_each: dict[str, str] = {}  # label -> its first held-out face: show one face per class first
    for name in held_out:
        first_of_each.setdefault(labels[name], name)
    names = [*first_of_each.values(), *(n for n in held_out if n not in first_of_each.values())][:count]
    size = resources.classifier(view.cards[0]).card.input_size if view.cards else 224
    faces, skipped = prepare_dataset_faces(dataset, names, size, view.settings(), resources.result_cache())
    for name, error in skipped.items():
        st.warning(
            render.markdown_escape(f"{hosting.image_label(name)} cannot be previewed: {hosting.redact(str(error))}")
        )
    columns = st.columns(max(len(faces), 1))
    empty: dict[str, int] = {}
    for column, (name, face) in zip(columns, faces.items()):
        column.image(
            render.regions_rgb(face.aligned, face.masks),
            caption=render.markdown_escape(hosting.image_label(name)),
            width="stretch",
        )
        for region, mask in zip(face.region_names, face.masks):
            if not mask.any():
                empty[region] = empty.get(region, 0) + 1
    st.markdown("Regions: " + render.region_legend([rule.name for rule in view.spec.regions]))
    for region, n in empty.items():
        st.warning(
            f"Region {render.markdown_escape(repr(region))} is empty on {n} of {len(names)} preview faces: its "
            "scores are NaN there."
        )


def rescored_tables(view: state.View, dataset: Dataset) -> None:
    """Tables 3 and 4 under the current spec, re-scored from the stored maps (no model runs)."""
    val, test = scores.score_table(view, "val"), scores.score_table(view, "test")
    for split, table in (("val", val), ("test", test)):
        if table is None:
            st.info(
                f"Nothing extracted for split {split!r} yet: extract it on the "
                f"{'Statistics' if split == 'val' else 'HPO correlation'} page, then edits re-score here."
            )
        elif table.origin is not scores.ScoreSource.STORE:
            st.info(render.markdown_escape(f"Split {split!r}: {table.note}."))
    if val is not None and val.origin is scores.ScoreSource.STORE:
        with st.container():
            st.markdown(f"**Table 3** (split val, re-scored in {val.seconds * 1000:.0f} ms; paper's test settings)")
            labels = val.table["label"].drop_nulls().unique().to_list()
            counts = significance_counts(compare_groups(val.table, **view.fidelity.rq1_options(labels)))
            methods = val.table["method"].n_unique()
            st.plotly_chart(render.heat_table(counts, "region", (0, methods), title="methods"), width="stretch")
    if test is not None and test.origin is scores.ScoreSource.STORE:
        with st.container():
            st.markdown(
                f"**Table 4** (split test, re-scored in {test.seconds * 1000:.0f} ms): mean (std) ρ over fold models"
            )
            try:
                summary = hpo_correlation(
                    test.table, resources.hpo_region_counts(dataset, **view.fidelity.region_count_options())
                ).summary
            except UserFacingError as error:
                st.info(hosting.shown_error(error))
            else:
                st.plotly_chart(
                    render.heat_table(
                        summary.pivot(on="region", index="method", values="rho_mean"),
                        "method",
                        (-1, 1),
                        text=table4_wide(summary),
                        title="ρ",
                    ),
                    width="stretch",
                )


def main() -> None:
    view = state.current()
    st.title("Regions")
    st.caption(
        "Edit which parts form each region and how its box grows; every change re-scores the stored "
        "relevance maps and updates Tables 3 and 4. The edited spec gets a short id in the URL."
    )
    if st.session_state.get(SOURCE) != view.spec_ref:
        _load_draft(view.spec, view.spec_ref)
    notice = st.session_state.get(NOTICE)
    if notice is not None:
        (st.error if notice.refused else st.info)(render.markdown_escape(notice.text))
    editor, results = st.columns([1, 1], gap="large")
    with editor:
        if hosting.may("analyst"):
            edit_spec(st.session_state[DRAFT])
            st.divider()
            key = "spec_upload"
            st.file_uploader("Import a spec (JSON)", type=["json"], key=key, on_change=_import, args=(key,))
        else:  # hosted mode, a viewer: the spec is shown, not edited (every edit saves a shared spec)
            st.caption("Editing and importing specs needs the analyst role; this is the spec in use.")
            st.dataframe(
                [
                    {
                        "region": rule.name,
                        "parts": ", ".join(_label_name(label) for label in rule.labels),
                        "boxes around": "; ".join(
                            ", ".join(_label_name(label) for label in box.labels) for box in rule.boxes
                        ),
                    }
                    for rule in view.spec.regions
                ],
                hide_index=True,
            )
        st.download_button(
            "Export this spec (JSON)",
            data=view.spec.to_json(),
            mime="application/json",
            file_name=re.sub(r"[^\w.-]+", "-", f"{view.spec.name or 'regions'}-{view.spec_ref}", flags=re.ASCII)
            + ".json",
        )
    with results:
        dataset = view.dataset
        if dataset is None:
            st.info("Choose a dataset in the sidebar to preview the masks and re-score it.")
            return
        try:
            preview(view, dataset)
            rescored_tables(view, dataset)
        except (UserFacingError, ValueError) as error:
            st.error(hosting.shown_error(error))


main()
