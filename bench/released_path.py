"""The released code's per-image RQ1 path, transcribed for timing only (``bench/extract_speed.py``).

From the authors' ``code/extract_region_coefficients.py`` (``evaluate_xai_maps``, ``get_relevance``,
``normalize_relevance``) and ``code/datasets/nih_faces.py`` (``NIHFacesDataset.__getitem__``,
``estimate_norm``, ``norm_crop2``): for every method, for every photo, one at a time (batch 1): read the
photo and its label map, align both with a bilinear warp, subtract the BGR mean, classify, find the
largest connected component of each part (twice per part, as released), draw the eye/nose/mouth boxes,
resolve eye/nose overlaps with the per-pixel Python loop over 224 × 224 pixels, attribute, take Σ|a|
over channels, resize, and append one row to a pandas frame. Nothing here is used by the project: the
project's own paper spec (``core/region_specs``) reproduces the boxes, and ``core.extract`` the whole path.

Departures, all for running without OpenCV (the project does not depend on it):
- ``cv2.warpAffine`` (bilinear, border 0) -> ``skimage.transform.warp(order=1, cval=0,
  preserve_range=True)``, rounded back to uint8 as OpenCV does.
- ``cv2.resize(x, (224, 224))`` -> a copy when ``x`` is 224 × 224 already (OpenCV's own shortcut for an
  equal size, the released case), else ``skimage.transform.resize(order=1)``.
- the attribution: ``core.attribute.attribute`` at batch 1, which makes the same Zennit/Captum calls
  as the released ``get_relevance`` with the project's method settings; the released
  ``normalize_relevance`` (Σ|a| over channels, no min–max) is kept.

Original code: Copyright (c) 2023 Ömer Sümer, MIT License:

    Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
    associated documentation files (the "Software"), to deal in the Software without restriction,
    including without limitation the rights to use, copy, modify, merge, publish, distribute,
    sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all copies or
    substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
    NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
    NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
    OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
    CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from skimage import transform as trans
from skimage.measure import label

from core.attribute import attribute

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def estimate_norm(lmk: np.ndarray, image_size: int = 112) -> np.ndarray:
    ratio = float(image_size) / 112.0 if image_size % 112 == 0 else float(image_size) / 128.0
    # released: SimilarityTransform().estimate(...), deprecated in skimage 0.26 for from_estimate
    return trans.SimilarityTransform.from_estimate(lmk, ARCFACE_DST * ratio).params


def norm_crop2(img: np.ndarray, landmark: np.ndarray, image_size: int) -> np.ndarray:
    """``cv2.warpAffine(img, M, (size, size), borderValue=0)``: bilinear, then rounded to uint8."""
    matrix = estimate_norm(landmark, image_size)
    warped = trans.warp(
        img,
        trans.AffineTransform(matrix).inverse,
        output_shape=(image_size, image_size),
        order=1,
        cval=0,
        preserve_range=True,
    )
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def resize_224(array: np.ndarray) -> np.ndarray:
    """``cv2.resize(array, (224, 224))``: a copy at equal size, else bilinear."""
    if array.shape[:2] == (224, 224):
        return array.copy()
    return trans.resize(array, (224, 224), order=1, preserve_range=True).astype(array.dtype)


def get_item(root: Path, row: dict, mean_bgr: np.ndarray, image_size: int = 224):
    """``NIHFacesDataset.__getitem__`` of the released code (no flip: the val split)."""
    image = np.asarray(Image.open(root / "images" / row["image_name"]).convert("RGB"))
    image = image[:, :, ::-1]  # RGB -> BGR
    segmap = np.asarray(Image.open(root / "features" / "segmaps" / Path(row["image_name"]).with_suffix(".png").name))
    landmark = np.array([row[f"{a}{k}"] for k in range(1, 6) for a in "xy"], dtype=np.float32).reshape(5, 2)
    image = norm_crop2(image, landmark, image_size)
    segmap = norm_crop2(segmap, landmark, image_size)
    tensor = torch.from_numpy((image.astype(np.float32) - mean_bgr).transpose(2, 0, 1).copy()).float()
    return tensor, np.array(segmap).astype(np.uint8), Path(row["image_name"]).stem


def largest_component(segmentation: np.ndarray, segmap: np.ndarray) -> np.ndarray:
    labels = label(segmentation)
    assert np.unique(label(segmap)).size > 1
    return labels == np.argmax(np.bincount(labels.flat)[1:]) + 1


def region_map_of(segmap: np.ndarray) -> np.ndarray:
    """The released eye/nose/mouth boxes and their per-pixel overlap loop (224 × 224 only, as released)."""
    segmap = resize_224(segmap)

    def extent(i: int) -> list:
        return list(np.argwhere(largest_component(segmap == i, segmap)).min(axis=0)) + list(
            np.argwhere(largest_component(segmap == i, segmap)).max(axis=0)
        )

    right_eye, left_eye = np.array([extent(i) for i in [2, 4]]), np.array([extent(i) for i in [3, 5]])
    reye_x1, reye_y1, reye_x2, reye_y2 = (
        right_eye[:, 1].min(),
        right_eye[:, 0].min(),
        right_eye[:, 3].max(),
        right_eye[:, 2].max(),
    )
    leye_x1, leye_y1, leye_x2, leye_y2 = (
        left_eye[:, 1].min(),
        left_eye[:, 0].min(),
        left_eye[:, 3].max(),
        left_eye[:, 2].max(),
    )
    reye_w, reye_h = reye_x2 - reye_x1, reye_y2 - reye_y1
    reye_x1, reye_y1, reye_x2, reye_y2 = (
        reye_x1 - int(0.2 * reye_w),
        reye_y1 - int(0.2 * reye_h),
        reye_x2 + int(0.1 * reye_w),
        reye_y2 + int(0.2 * reye_h),
    )
    leye_w, leye_h = leye_x2 - leye_x1, leye_y2 - leye_y1
    leye_x1, leye_y1, leye_x2, leye_y2 = (
        leye_x1 - int(0.1 * leye_w),
        leye_y1 - int(0.2 * leye_h),
        leye_x2 + int(0.2 * leye_w),
        leye_y2 + int(0.2 * leye_h),
    )
    nose = extent(6)
    nose_x1, nose_y1, nose_x2, nose_y2 = nose[:2][::-1] + nose[2:][::-1]
    nose_y1 = min(reye_y1, leye_y1) + int(0.3 * min(reye_h, leye_h))
    mouth = np.array([extent(i) for i in [7, 9]])
    mouth_x1, mouth_y1, mouth_x2, mouth_y2 = mouth[:, 1].min(), mouth[:, 0].min(), mouth[:, 3].max(), mouth[:, 2].max()
    mouth_y2 += int(0.5 * (mouth_y1 - nose_y2))
    mouth_y1, nose_y2 = 2 * [int(0.5 * (mouth_y1 + nose_y2))]
    mouth_x1, mouth_x2 = mouth_x1 - int(0.2 * (mouth_x2 - mouth_x1)), mouth_x2 + int(0.2 * (mouth_x2 - mouth_x1))
    mouth_y2 = min(mouth_y2, 224)

    region_map = np.zeros(shape=(224, 224, 3), dtype=np.uint8)
    region_map[reye_y1:reye_y2, reye_x1:reye_x2, 0] = 1
    region_map[leye_y1:leye_y2, leye_x1:leye_x2, 0] = 1
    region_map[nose_y1:nose_y2, nose_x1:nose_x2, 1] = 1
    region_map[mouth_y1:mouth_y2, mouth_x1:mouth_x2, 2] = 1
    for i in range(224):
        for j in range(224):
            region_map[i, j, :] = [1, 0, 0] if (region_map[i, j, :] == [1, 1, 0]).all() else region_map[i, j, :]
    return region_map


def evaluate_xai_maps(
    network: torch.nn.Module, root: Path, rows: list[dict], method: str, categories: list[str], mean_bgr: np.ndarray
) -> pd.DataFrame:
    """``evaluate_xai_maps`` of the released code for one model and method: one photo at a time."""
    results = pd.DataFrame(
        columns=["backbone", "fold", "image_name", "method", "eye_xai", "nose_xai", "mouth_xai", "label", "predicted"]
        + [f"p_{c}" for c in categories]
    )
    for n, row in enumerate(rows):
        image, segmap, filename = get_item(root, row, mean_bgr)
        input = image.unsqueeze(0)
        input.requires_grad = True
        output = network(input)
        prob_output = torch.nn.functional.softmax(output, dim=1).detach().cpu().numpy().squeeze()
        pred_label_idx = int(np.argmax(prob_output))
        region_map = region_map_of(segmap)
        # get_relevance + normalize_relevance: Σ|a| over channels, not min–max normalised
        attribution = attribute(network, input.detach(), [pred_label_idx], method)
        relevance_map = resize_224(attribution.abs().sum(1).detach().cpu().numpy().squeeze())
        relevance_map = (
            region_map[:, :, 0] * relevance_map
            + region_map[:, :, 1] * relevance_map
            + region_map[:, :, 2] * relevance_map
        )
        eye_xai = np.sum(relevance_map * region_map[:, :, 0]) / np.sum(region_map[:, :, 0] != 0)
        nose_xai = np.sum(relevance_map * region_map[:, :, 1]) / np.sum(region_map[:, :, 1] != 0)
        mouth_xai = np.sum(relevance_map * region_map[:, :, 2]) / np.sum(region_map[:, :, 2] != 0)
        results.loc[n] = (
            ["bench", "fold-1", filename, method, eye_xai, nose_xai, mouth_xai]
            + [row["label"], categories[pred_label_idx]]
            + [f"{p:2.3f}" for p in prob_output]
        )
    return results
