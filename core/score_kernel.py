"""Compiled run-length sums for re-scoring stored maps (issue 12): Σ(map·mask_r) read in place.

``core.score.segment_sums`` walks a ``SumPlan`` (its copies, run bounds and slots) with numpy and torch:
each span is cast float16 -> float32 into a buffer, ``np.add.reduceat`` sums its runs and ``np.bincount``
collects them into regions. This kernel walks the same plan in one compiled loop per chunk of maps: it
reads each run of a region straight from the (memory-mapped) maps file, converts float16 -> float32 with
the CPU's own instruction (LLVM ``fpext half``: exact for every float16, subnormals, inf and NaN
included), adds in float64 and skips the runs of "no region" without reading them. No buffer, no
per-run Python or numpy call. The region means are still divided in one place, ``core.score.region_means``.

numba compiles the kernel on first use (about a second, once per process; nothing is written to disk).
Without numba installed ``available()`` is False and ``core.score`` keeps its numpy path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np


def available() -> bool:
    """Whether the compiled kernel can run here (numba importable)."""
    return _kernels() is not None


def chunk_sums(
    values: np.ndarray,
    bounds: np.ndarray,
    labels: np.ndarray,
    copies: np.ndarray,
    used: int,
    regions: int,
    out: np.ndarray,
) -> None:
    """Add one ``SumPlan``'s region sums into ``out`` (k × (``regions`` + 1) float64, zeroed by the caller;
    the last column, "no region", stays zero: those runs are skipped).

    ``values``: the flattened maps file as uint16 (float16 bits) or float32; ``copies``: the plan's
    (first, end, place) rows as an int64 m × 3 array; ``bounds``/``labels``: its runs (buffer position,
    row × (regions + 1) + region, label ``regions`` meaning no region)."""
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("numba is not installed: core.score falls back to its numpy path")
    kernel = kernels[0] if values.dtype == np.uint16 else kernels[1]
    kernel(values, bounds, labels, copies, used, regions, out)


@functools.cache
def _kernels() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """(float16-bits kernel, float32 kernel), compiled lazily; None without numba."""
    try:
        import numba
        from llvmlite import ir
        from numba.core import types
        from numba.extending import intrinsic
    except ImportError:
        return None

    @intrinsic
    def half_to_float(typingctx: Any, bits: Any) -> Any:
        """float16 bits -> float32, exactly (vcvtph2ps where the CPU has F16C)."""
        if bits != types.uint16:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    @numba.njit(nogil=True)
    def as_float(value: Any) -> Any:
        return value

    def make(convert: Any) -> Callable[..., None]:
        @numba.njit(nogil=True, boundscheck=False)
        def kernel(values, bounds, labels, copies, used, regions, out):
            flat = out.reshape(-1)
            skip = np.zeros(flat.size, dtype=np.bool_)
            skip[regions :: regions + 1] = True
            copy = 0
            runs = bounds.size
            for k in range(runs):
                label = labels[k]
                if skip[label]:
                    continue  # outside every region: never read
                start = bounds[k]
                end = bounds[k + 1] if k + 1 < runs else used
                # The copy holding this run (runs never cross copies; copies lie end to end in the buffer).
                while copy + 1 < copies.shape[0] and start >= copies[copy, 2] + copies[copy, 1] - copies[copy, 0]:
                    copy += 1
                first = copies[copy, 0] + start - copies[copy, 2]
                # Eight independent float64 sums: runs are short (~35 pixels), too short for the
                # compiler's own vector loop (64 elements a turn), and one chain would wait on each add.
                last = first + end - start
                eights = first + (end - start) // 8 * 8
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
                for p in range(first, eights, 8):
                    s0 += convert(values[p])
                    s1 += convert(values[p + 1])
                    s2 += convert(values[p + 2])
                    s3 += convert(values[p + 3])
                    s4 += convert(values[p + 4])
                    s5 += convert(values[p + 5])
                    s6 += convert(values[p + 6])
                    s7 += convert(values[p + 7])
                for p in range(eights, last):
                    s0 += convert(values[p])
                flat[label] += ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))

        return kernel

    return make(half_to_float), make(as_float)
