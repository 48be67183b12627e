"""Websocket bytes a browser receives while the Explain page shows an upload (issue 13). Nothing asserted.

A synthetic face in a 4000×3000 photo (12 MP, JPEG) is uploaded through the real upload route of a
``streamlit run`` on a free port (``dashboard.screenshots.serve``), in Debian's Chromium through Playwright;
without a model the page shows the photo with its landmarks, the aligned face, its parts and regions.
Counted: the websocket frames the browser receives from the upload until the script has settled, then one
rerun (ticking the cache checkbox).

    .venv/bin/python bench/upload_payload.py [--side 4000]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.synth import plan_images
from core.synth.faces import render_face
from dashboard.screenshots import browser, serve, settled


def photo(width: int) -> bytes:
    """A synthetic face, upscaled to a square of 3/4 ``width``, centred on a plain width × 3/4 width photo."""
    height = width * 3 // 4
    face = render_face(plan_images(1, seed=5, size=224)[0].params).image
    big = np.asarray(Image.fromarray(face).resize((height, height), Image.Resampling.BILINEAR))
    canvas = np.zeros((height, width, 3), np.uint8) + big[0, 0]
    left = (width - height) // 2
    canvas[:, left : left + height] = big
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4000, help="the photo's width in pixels (height: 3/4 of it)")
    args = parser.parse_args(argv)
    upload = photo(args.side)
    pixels = args.side * (args.side * 3 // 4)
    print(f"upload: {args.side}x{args.side * 3 // 4} ({pixels / 1e6:.0f} MP), {len(upload) / 2**20:.1f} MB JPEG")
    with tempfile.TemporaryDirectory() as folder:
        env = {"XAI_CACHE_DIR": f"{folder}/cache/results", "XAI_DATA_DIR": f"{folder}/data"}
        with serve(env) as base, browser(Path(folder) / "profile") as context:
            page = context.new_page()
            received: list[int] = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda data: received.append(len(data))))
            page.goto(f"{base}/?source=upload")
            settled(page)
            start = sum(received)
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
                files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": upload}]
            )
            page.get_by_text("Aligned face").first.wait_for(timeout=300_000)
            settled(page)
            shown = sum(received) - start
            start = sum(received)
            page.get_by_text("Cache results of this upload on disk").click()
            page.wait_for_timeout(1000)
            settled(page)
            rerun = sum(received) - start
    print(f"websocket bytes received: upload shown {shown / 2**20:.2f} MB; one rerun {rerun / 2**20:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
