"""Row blocks run in threads: numpy, scipy.ndimage and torch release the GIL in their loops, so contiguous blocks
of output rows computed in threads overlap on the cores (each value is computed as in one call)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["in_row_blocks"]


def in_row_blocks(fn: Callable[[int, int], None], start: int, stop: int, threads: int) -> None:
    """Call ``fn(a, b)`` on up to ``threads`` contiguous blocks covering rows ``start..stop`` (in the calling thread
    when one block); a block's exception is raised here."""
    n = max(0, int(stop) - int(start))
    parts = max(1, min(int(threads), n))
    cuts = [int(start) + (n * k) // parts for k in range(parts + 1)]
    if parts == 1:
        fn(cuts[0], cuts[1])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parts) as pool:
        list(pool.map(fn, cuts[:-1], cuts[1:]))  # list(): re-raises a block's exception
