"""Pictures for the pages: colours and overlays only, no science; and ``markdown_escape`` for text from users."""

from __future__ import annotations

import base64
import io
import re
import string

import numpy as np
import plotly.graph_objects as go
import polars as pl
from PIL import Image

from core.deployment import Limits

# One colour per LaPa label id (core.parse.LAPA_LABELS).
LAPA_COLOURS = np.array(
    [
        (0, 0, 0),
        (235, 195, 160),
        (120, 60, 20),
        (160, 80, 30),
        (30, 120, 220),
        (60, 160, 240),
        (230, 90, 60),
        (200, 30, 80),
        (90, 10, 30),
        (240, 70, 120),
        (90, 70, 50),
    ],
    dtype=np.uint8,
)
REGION_COLOURS = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 190),
    ],
    dtype=np.uint8,
)


# Every ASCII punctuation character may be backslash-escaped in CommonMark and then reads as itself: links,
# images, emphasis, code, HTML, entities, headings, lists, tables, math ($), directives (:red[…]) and GFM's
# bare-URL autolinks (https://…, www.…, a@b.c need those characters unescaped and contiguous) all need one.
_ESCAPED = re.compile("[" + re.escape(string.punctuation) + "]")
_WORD_JOINER = "\u2060"  # invisible; breaks :name: (emoji, :material/…: icons) that Streamlit looks up after parsing
_LINE_BREAKS = re.compile(r"[\r\n\t\f\v\u2028\u2029\x85]")


def markdown_escape(text: object) -> str:
    """``text`` as Markdown that Streamlit renders as exactly that text, whatever it holds: no link, image,
    emphasis, heading, list, table, code, HTML, math, colour directive, emoji shortcode or Material icon.
    For every user-controlled name (spec and region names, dataset titles, file names, error text quoting
    them) put into ``st.markdown``/``caption``/``info``/``warning``/``error``/``success``/``write``, widget
    labels, help texts and image captions. Line breaks become spaces: a name is one line, and a new line
    could start a block (a heading, a table) of its own.

    Streamlit replaces ``:material/`` in the source and looks up ``:shortcode:`` emoji in the parsed text,
    where a backslash no longer shows; so a colon is also followed by an invisible word joiner."""
    escaped = _ESCAPED.sub(lambda match: "\\" + match.group(), _LINE_BREAKS.sub(" ", str(text)))
    return escaped.replace(":", ":" + _WORD_JOINER)


def plotly_escape(text: object) -> str:
    """``text`` for a Plotly label (legend, axis, tick, hover): Plotly reads ``<a href=…>``, ``<b>`` and other
    tags in them, so a region name like ``<a href="https://…">`` would be a link; entities show as the text."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def label_map_rgb(label_map: np.ndarray) -> np.ndarray:
    return LAPA_COLOURS[np.clip(label_map, 0, len(LAPA_COLOURS) - 1)]


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float, where: np.ndarray | None = None) -> np.ndarray:
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * overlay.astype(np.float32)
    if where is not None:
        mixed = np.where(where[..., None], mixed, image)
    return mixed.clip(0, 255).astype(np.uint8)


def regions_rgb(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colour = np.zeros_like(image)
    for r, mask in enumerate(masks):
        colour[mask] = REGION_COLOURS[r % len(REGION_COLOURS)]
    return blend(image, colour, alpha, where=np.asarray(masks.any(axis=0)))


def heatmap_rgb(image: np.ndarray, relevance: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Relevance in [0, 1] (or [-1, 1] for signed) as a red (positive) / blue (negative) overlay on a grey face."""
    grey = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    positive = np.clip(relevance, 0, 1)[..., None]
    negative = np.clip(-relevance, 0, 1)[..., None]
    colour = 255 * (positive * np.array([1.0, 0.1, 0.0]) + negative * np.array([0.0, 0.3, 1.0]))
    weight = alpha * np.maximum(positive, negative)
    return ((1 - weight) * grey + weight * colour).clip(0, 255).astype(np.uint8)


def scaled_for_display(relevance: np.ndarray) -> np.ndarray:
    """A non-negative map divided by its maximum (an all-zero map stays zero), for ``heatmap_rgb``."""
    top = float(np.max(relevance)) if relevance.size else 0.0
    return relevance / top if top > 0 else np.zeros_like(relevance)


DISPLAY_PIXELS = Limits().display_pixels  # longest side of a photo sent to the browser, by default


def display_size(
    image: np.ndarray, points: np.ndarray | None = None, limit: int = DISPLAY_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` shrunk (never enlarged) so its longer side is at most ``limit`` pixels, and ``points`` (x, y in
    pixels) moved with it: the browser gets a picture at the size it shows, not the full photo."""
    height, width = image.shape[:2]
    if max(height, width) <= limit:
        return image, points
    scale = limit / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    if points is None:
        return small, None
    factors = np.array([size[0] / width, size[1] / height])
    return small, (points + 0.5) * factors - 0.5  # pixel centres map to pixel centres


def png_data_uri(image: np.ndarray) -> str:
    """An RGB image as a PNG data URI (for ``go.Image(source=...)``: compressed bytes, not a JSON array)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # encoded on every page run: speed first
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_figure(
    image: np.ndarray, points: np.ndarray | None = None, height: int = 360, limit: int = DISPLAY_PIXELS
) -> go.Figure:
    """The photo at display size (``display_size``) as a PNG, with ``points`` marked; the figure's JSON holds
    a compressed picture of at most ``limit`` pixels a side, whatever the photo's size."""
    image, points = display_size(image, points, limit)
    figure = go.Figure(go.Image(source=png_data_uri(image)))
    if points is not None:
        figure.add_trace(
            go.Scatter(
                x=points[:, 0],
                y=points[:, 1],
                mode="markers+text",
                text=["L eye", "R eye", "nose", "L mouth", "R mouth"],
                textposition="top center",
                marker=dict(color="#00e5ff", size=9, line=dict(color="black", width=1)),
                textfont=dict(color="#00e5ff"),
                showlegend=False,
            )
        )
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=0, b=0))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


# Streamlit's named markdown colours nearest to REGION_COLOURS, in the same order.
_MARKDOWN_COLOURS = ("red", "green", "blue", "orange", "violet")


def region_legend(names) -> str:
    """Region names coloured as their masks are (markdown; the names escaped)."""
    return ", ".join(
        f":{_MARKDOWN_COLOURS[r]}[**{markdown_escape(name)}**]" if r < len(_MARKDOWN_COLOURS) else markdown_escape(name)
        for r, name in enumerate(names)
    )


def parts_rgb(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    return blend(image, label_map_rgb(label_map), 0.55, where=label_map > 0)


def probability_bars(classes, probabilities: np.ndarray, top: int = 5) -> go.Figure:
    order = np.argsort(probabilities)[::-1][:top][::-1]
    figure = go.Figure(go.Bar(x=probabilities[order], y=[classes[i] for i in order], orientation="h"))
    return figure.update_layout(
        height=200, margin=dict(l=0, r=0, t=0, b=0), xaxis_title="probability", xaxis_range=[0, 1]
    )


def region_score_bars(scores, region_names) -> go.Figure:
    """Grouped bars: one group per method, one bar per region, coloured as the region masks."""
    figure = go.Figure()
    for r, region in enumerate(region_names):
        colour = "rgb({}, {}, {})".format(*REGION_COLOURS[r % len(REGION_COLOURS)])
        figure.add_bar(
            name=plotly_escape(region), x=list(scores), y=[values[r] for values in scores.values()], marker_color=colour
        )
    return figure.update_layout(barmode="group", height=340, yaxis_title="region score C_i", margin=dict(t=10))


def heat_table(
    table: pl.DataFrame, index: str, value_range: tuple[float, float], text: pl.DataFrame | None = None, title: str = ""
) -> go.Figure:
    """A wide table as a heatmap with its values written in the cells (``text``: other cell labels, same shape).

    A range below zero (a correlation) gets a diverging scale centred on 0; otherwise a sequential one."""
    columns = [c for c in table.columns if c != index]
    values = table.select(pl.col(columns).cast(pl.Float64)).to_numpy()
    labels: list[list[str]] | np.ndarray
    if text is None:
        labels = [["" if np.isnan(v) else f"{v:.3g}" for v in row] for row in values]
    else:
        labels = table.select(index).join(text, on=index, how="left").select(columns).to_numpy()
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=[plotly_escape(column) for column in columns],  # region names come from users' specs
            y=[plotly_escape(v) for v in table[index]],
            text=labels,
            texttemplate="%{text}",
            textfont=dict(size=13),
            colorscale="RdBu_r" if value_range[0] < 0 else "Blues",
            zmin=value_range[0],
            zmax=value_range[1],
            colorbar=dict(title=title),
            hovertemplate=f"{index} %{{y}}<br>%{{x}}: %{{text}}<extra></extra>",
        )
    )
    figure.update_yaxes(autorange="reversed")
    return figure.update_layout(height=90 + 30 * len(table), margin=dict(l=0, r=0, t=10, b=0))


def group_boxes(table: pl.DataFrame, reference: str) -> go.Figure:
    """Figure 6: one box per group within each region (score table rows of one method); reference first."""
    labels = sorted(table["label"].unique().to_list(), key=lambda label: (label != reference, label))
    figure = go.Figure()
    for label in labels:
        rows = table.filter(pl.col("label") == label)
        figure.add_box(
            x=[plotly_escape(region) for region in rows["region"].to_list()],
            y=rows["score"].to_list(),
            name=plotly_escape(label),
            boxmean=True,
        )
    return figure.update_layout(
        boxmode="group",
        height=360,
        yaxis_title="region score C_i",
        margin=dict(l=0, r=0, t=10, b=0),
        legend_title_text="group",
    )


def count_scatter(points: pl.DataFrame, region: str) -> go.Figure:
    """C_i against the HPO count of the region, one colour per fold model (score-table rows joined with counts)."""
    figure = go.Figure()
    for model in sorted(points["model"].unique().to_list()):
        rows = points.filter(pl.col("model") == model)
        figure.add_scatter(
            x=rows["count"].to_list(),
            y=rows["score"].to_list(),
            mode="markers",
            name=model,
            text=rows["image_name"].to_list(),
            hovertemplate="%{text}<br>count %{x}, C_i %{y:.3f}",
        )
    return figure.update_layout(
        height=360,
        xaxis_title=f"HPO terms marked in the {plotly_escape(region)} region (raters summed)",
        yaxis_title="region score C_i",
        margin=dict(l=0, r=0, t=10, b=0),
    )


def chi2_bars(chi2: pl.DataFrame, top: int = 25) -> go.Figure:
    """Figure 4b: the terms with the largest χ², coloured by region."""
    rows = chi2.filter(pl.col("chi2").is_not_null()).sort("chi2", descending=True).head(top).reverse()
    figure = go.Figure()
    for region in rows["region"].unique(maintain_order=True).to_list():
        part = rows.filter(pl.col("region") == region)
        figure.add_bar(
            x=part["chi2"].to_list(),
            y=part["term"].to_list(),
            orientation="h",
            name=region,
            customdata=part["p"].to_list(),
            hovertemplate="%{y}: χ² %{x:.1f}, p %{customdata:.2g}",
        )
    figure.update_yaxes(categoryorder="array", categoryarray=rows["term"].to_list())
    return figure.update_layout(
        height=120 + 18 * len(rows),
        xaxis_title="χ² (term × syndrome)",
        margin=dict(l=0, r=0, t=10, b=0),
        legend_title_text="region",
    )


def tsne_scatter(embedding: pl.DataFrame) -> go.Figure:
    """Figure 4a: one point per annotated image, coloured by its label."""
    figure = go.Figure()
    for label in sorted(embedding["label"].unique().to_list()):
        rows = embedding.filter(pl.col("label") == label)
        figure.add_scatter(
            x=rows["x"].to_list(),
            y=rows["y"].to_list(),
            mode="markers",
            name=label,
            text=rows["image_name"].to_list(),
            hovertemplate="%{text}",
        )
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False)
    return figure.update_layout(height=420, margin=dict(l=0, r=0, t=10, b=0), legend_title_text="label")
