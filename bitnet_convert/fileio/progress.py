"""Progress on stderr while tensors are written: bytes and ETA when stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total_bytes: int, desc: str, quiet: bool = False) -> tqdm:
    """A byte-counting bar; silent when `quiet` or when stderr is not a terminal (logs, CI)."""
    return tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
        leave=False,
    )
