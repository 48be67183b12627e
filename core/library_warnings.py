"""Warnings from libraries that users cannot act on, silenced by the front ends (CLI, dashboard, benchmarks)."""

from __future__ import annotations

import warnings


def quiet_library_warnings() -> None:
    """Captum announces every hook it sets; users cannot act on that, so the edges silence it."""
    warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)
    warnings.filterwarnings(
        "ignore", message=r"Input Tensor \d+ did not already require gradients", category=UserWarning
    )
