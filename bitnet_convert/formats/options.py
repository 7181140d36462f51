"""What a writer option is: the CLI flags and the API's keyword arguments are made from these, in each format's
module (`WRITER_OPTIONS`), from the same tables the writer itself checks its arguments against. Also the
values a user types for them (sizes, counts, `--metadata KEY=VALUE`), each checked into one error line."""

from __future__ import annotations

import dataclasses
import re

from bitnet_core.errors import ConvertError

CHOICE, FLAG, SIZE, COUNT = "choice", "flag", "size", "count"


@dataclasses.dataclass(frozen=True)
class WriterOption:
    choices: tuple[str, ...]
    default: str | None  # None: the writer decides (its help says how)
    help: str
    kind: str = CHOICE  # CHOICE (one of `choices`), FLAG (on or off), SIZE (bytes: 500M, 2G), COUNT (1, 2, ...)


# --split-max-size's units, as llama.cpp's converter reads them (powers of 1000)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"([0-9]{1,20})([KMGT]?)B?", re.IGNORECASE)
_COUNT = re.compile(r"[0-9]{1,20}")
MAX_U64 = 2**64 - 1


def size_value(value, option: str) -> int:
    """A byte count typed as 1000000, 500M or 2G (K, M, G, T: powers of 1000), positive and within 64 bits."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if match is None:
            raise ConvertError(f"{option}: {_shown(value)} is not a size (a whole number of bytes, or with K, M, "
                               "G or T: 500M, 2G)")
        number = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if not 0 < number <= MAX_U64:
        raise ConvertError(f"{option}: {_shown(value)} is out of range (1 byte to 2^64 - 1)")
    return number


def count_value(value, option: str, limit: int = 2**31 - 1) -> int:
    """A positive whole number up to `limit` (a GGUF split's tensor count is an int32)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _COUNT.fullmatch(value.strip()):
        number = int(value)
    else:
        raise ConvertError(f"{option}: {_shown(value)} is not a positive whole number")
    if not 0 < number <= limit:
        raise ConvertError(f"{option}: {_shown(value)} is out of range (1 to {limit})")
    return number


# ------------------------------------------------------------------------------------------ --metadata KEY=VALUE

# The general.* keys a user may set (gguf-py's Keys.General, the string-valued ones), as llama.cpp's converter
# writes them from its metadata overrides. Every other key a writer owns: the architecture, the file type,
# counts, hyperparameters, the tokenizer, split keys and our provenance.
METADATA_KEYS = frozenset(f"general.{name}" for name in (
    "name", "author", "version", "organization", "finetune", "basename", "description", "quantized_by",
    "size_label", "license", "license.name", "license.link", "url", "doi", "uuid", "repo_url",
    "source.url", "source.doi", "source.uuid", "source.repo_url",
))
MAX_METADATA_BYTES = 1 << 16  # one value; a license text fits, a file pasted by mistake does not


def metadata_values(pairs) -> dict[str, str]:
    """`--metadata KEY=VALUE` items (strings, or a mapping from the API) -> {key: value}, each checked: a key
    of METADATA_KEYS, given once, a UTF-8 value of at most MAX_METADATA_BYTES without NUL characters."""
    if not pairs:
        return {}
    items = list(pairs.items()) if isinstance(pairs, dict) else [_split_pair(pair) for pair in pairs]
    values: dict[str, str] = {}
    for key, value in items:
        if not isinstance(key, str) or key not in METADATA_KEYS:
            raise ConvertError(f"--metadata: {_shown(key)} is not a key a user sets (one of "
                               f"{', '.join(sorted(METADATA_KEYS))}); the writer owns the others")
        if key in values:
            raise ConvertError(f"--metadata: {key} is given twice")
        if not isinstance(value, str):
            raise ConvertError(f"--metadata: {key}: the value must be a string")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConvertError(f"--metadata: {key}: the value is not valid UTF-8") from None
        if "\0" in value:
            raise ConvertError(f"--metadata: {key}: the value holds a NUL character")
        if len(encoded) > MAX_METADATA_BYTES:
            raise ConvertError(f"--metadata: {key}: the value is {len(encoded):,} bytes; at most "
                               f"{MAX_METADATA_BYTES:,}")
        values[key] = value
    return values


def _split_pair(pair) -> tuple[str, str]:
    if not isinstance(pair, str) or "=" not in pair:
        raise ConvertError(f"--metadata: {_shown(pair)} is not KEY=VALUE")
    key, value = pair.split("=", 1)
    return key, value


def _shown(value) -> str:
    """A user's value in an error line: quoted, escaped (no newline breaks the line), at most 60 characters."""
    text = repr(value if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:57] + "..."
