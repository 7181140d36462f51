"""The YAML front matter of a model card (README.md), in the few forms model cards use, without a YAML parser.

Hub model cards open with `---`, then top-level `key: value` lines and lists (`key:` followed by `- item`
lines, or `key: [a, b]`), then `---`. That is all llama.cpp's converter takes from them for a model's
general.* keys (license, base_model, tags, language, name ...), so that is all this reads: scalars and lists of
scalars at the top level, quotes removed; nested mappings and anything else are skipped. Bounded: only the
first MAX_BYTES of the file are looked at, and a front matter that does not close within them is ignored, as is
a card without one. A model card is documentation: nothing in it can stop a conversion.
"""

from __future__ import annotations

import re
from pathlib import Path

FILE = "README.md"
MAX_BYTES = 64 << 10
_KEY = re.compile(r"([A-Za-z_][\w.-]*)\s*:(?:\s+(.*))?$")
_ITEM = re.compile(r"\s*-\s+(.*)$")


def read(folder: Path) -> dict[str, str | list[str]]:
    """The front matter of `folder`/README.md ({} when there is none, or it is not a readable regular file)."""
    path = Path(folder) / FILE
    try:
        if not path.is_file():
            return {}
        with open(path, "rb") as fh:
            head = fh.read(MAX_BYTES)
    except OSError:
        return {}
    return parse(head.decode("utf-8", errors="replace"))


def parse(text: str) -> dict[str, str | list[str]]:
    lines = text.splitlines()
    if not lines or lines[0].rstrip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.rstrip() in ("---", "..."))
    except StopIteration:
        return {}  # not closed within MAX_BYTES
    card: dict[str, str | list[str]] = {}
    key = None  # the key whose list items may follow
    for line in lines[1:end]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = _ITEM.match(line)
        if item and key is not None:
            value = _scalar(item.group(1))
            if value is not None and isinstance(card.get(key), list):
                card[key].append(value)
            continue
        if line[0] in " \t":  # nested under a key: not a form we read
            if key is not None and card.get(key) == []:
                del card[key]  # a mapping, not a list
            key = None
            continue
        match = _KEY.match(line)
        key = None
        if match is None:
            continue
        name, raw = match.group(1), (match.group(2) or "").strip()
        if not raw or raw.startswith("#"):
            card[name], key = [], name
        elif raw.startswith("[") and raw.endswith("]"):
            items = [_scalar(part) for part in raw[1:-1].split(",")] if raw[1:-1].strip() else []
            card[name] = [value for value in items if value is not None]
        else:
            value = _scalar(raw)
            if value is not None:
                card[name] = value
    return {name: value for name, value in card.items() if value != []}


def _scalar(raw: str) -> str | None:
    """A plain or quoted scalar as a string; None for what is not one (a mapping, a block scalar)."""
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        close = raw.find(quote, 1)
        return raw[1:close] if close > 0 else None
    raw = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    if not raw or raw[0] in "{[|>&*!" or ": " in raw or raw.endswith(":"):
        return None  # a mapping, a flow collection, a block scalar, an anchor, alias or tag
    return raw
