"""Warnings from libraries that users cannot act on, silenced by the front ends (CLI, dashboard, benchmarks);
and, for server processes, warnings whose text stays out of the log at WARNING."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


def quiet_library_warnings() -> None:
    """Captum announces every hook it sets; users cannot act on that, so the edges silence it."""
    warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)
    warnings.filterwarnings(
        "ignore", message=r"Input Tensor \d+ did not already require gradients", category=UserWarning
    )


def warnings_without_data() -> None:
    """For server processes (the dashboard): a warning's text may name photos or server paths (the photos an
    extraction left out, the faces where a region is empty), so it goes to the log at DEBUG only; at WARNING
    the log says only which warning was raised (its category, source file name and line). The CLI keeps the
    full text: it speaks to the user who owns the files."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        where = f"{category.__name__} at {Path(filename).name}:{lineno}"
        log.warning("%s (its text may name photos or files: logged at DEBUG)", where)
        log.debug("%s: %s", where, message)

    warnings.showwarning = show
