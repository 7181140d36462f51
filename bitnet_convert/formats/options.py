"""What a writer option is: the CLI flags and the API's keyword arguments are made from these, in each format's
module (`WRITER_OPTIONS`), from the same tables the writer itself checks its arguments against."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WriterOption:
    choices: tuple[str, ...]
    default: str | None  # None: the writer decides (its help says how)
    help: str
