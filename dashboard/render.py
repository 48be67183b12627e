"""Pictures for the pages: colours and overlays only, no science."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# One colour per LaPa label id (core.parse.LAPA_LABELS).
LAPA_COLOURS = np.array([
    (0, 0, 0), (235, 195, 160), (120, 60, 20), (160, 80, 30), (30, 120, 220), (60, 160, 240),
    (230, 90, 60), (200, 30, 80), (90, 10, 30), (240, 70, 120), (90, 70, 50),
], dtype=np.uint8)
REGION_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)], dtype=np.uint8)


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
    return blend(image, colour, alpha, where=masks.any(axis=0))


def heatmap_rgb(image: np.ndarray, relevance: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Relevance in [0, 1] (or [-1, 1] for signed) as a red (positive) / blue (negative) overlay on a grey face."""
    grey = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    positive = np.clip(relevance, 0, 1)[..., None]
    negative = np.clip(-relevance, 0, 1)[..., None]
    colour = 255 * (positive * np.array([1.0, 0.1, 0.0]) + negative * np.array([0.0, 0.3, 1.0]))
    weight = alpha * np.maximum(positive, negative)
    return ((1 - weight) * grey + weight * colour).clip(0, 255).astype(np.uint8)


def image_figure(image: np.ndarray, points: np.ndarray | None = None, height: int = 360) -> go.Figure:
    figure = go.Figure(go.Image(z=image))
    if points is not None:
        figure.add_trace(go.Scatter(
            x=points[:, 0], y=points[:, 1], mode="markers+text", text=["L eye", "R eye", "nose", "L mouth", "R mouth"],
            textposition="top center", marker=dict(color="#00e5ff", size=9, line=dict(color="black", width=1)),
            textfont=dict(color="#00e5ff"), showlegend=False,
        ))
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=0, b=0))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


# Streamlit's named markdown colours nearest to REGION_COLOURS, in the same order.
_MARKDOWN_COLOURS = ("red", "green", "blue", "orange", "violet")


def region_legend(names) -> str:
    """Region names coloured as their masks are (markdown)."""
    return ", ".join(f":{_MARKDOWN_COLOURS[r]}[**{name}**]" if r < len(_MARKDOWN_COLOURS) else name
                     for r, name in enumerate(names))


def parts_rgb(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    return blend(image, label_map_rgb(label_map), 0.55, where=label_map > 0)


def probability_bars(classes, probabilities: np.ndarray, top: int = 5) -> go.Figure:
    order = np.argsort(probabilities)[::-1][:top][::-1]
    figure = go.Figure(go.Bar(x=probabilities[order], y=[classes[i] for i in order], orientation="h"))
    return figure.update_layout(height=200, margin=dict(l=0, r=0, t=0, b=0), xaxis_title="probability",
                                xaxis_range=[0, 1])


def region_score_bars(scores, region_names) -> go.Figure:
    """Grouped bars: one group per method, one bar per region, coloured as the region masks."""
    figure = go.Figure()
    for r, region in enumerate(region_names):
        colour = "rgb({}, {}, {})".format(*REGION_COLOURS[r % len(REGION_COLOURS)])
        figure.add_bar(name=region, x=list(scores), y=[values[r] for values in scores.values()], marker_color=colour)
    return figure.update_layout(barmode="group", height=340, yaxis_title="region score C_i", margin=dict(t=10))
