"""What a checkpoint's tokenizer files must look like, checked once, when the checkpoint is read.

Writers and `generate` parse these files (the GGUF writer turns tokenizer.json or tokenizer.model into
tokenizer.ggml.* keys, generate takes end-of-sequence ids from generation_config.json). A file that is not JSON,
or JSON of another shape (a list where an object belongs, an id that is a string), must stop the read with the
file named, not surface later as a TypeError inside a writer. Only the fields this tool reads are checked; the
rest is carried verbatim.

A real tokenizer.json is large (Llama 3's: 9 MB, 128k tokens, 280k merges), so it is parsed once per process
and its checks walk the big lists in C (set/map over the whole list) rather than one Python call per item:
`parsed()` keeps the last few documents, by the identity of their bytes, for the GGUF writer to reuse.
"""

from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping

from bitnet_convert.fileio.sources import parse_json
from bitnet_convert.formats import sentencepiece_model
from bitnet_core.errors import ConvertError

TEXT_FILES = ("merges.txt",)  # plus every *.jinja chat template
SENTENCEPIECE_FILE = "tokenizer.model"


def check(files: Mapping[str, bytes], where: Callable[[str], str]) -> None:
    """Refuse the first tokenizer file that is not of its expected shape; `where(name)` names it in messages."""
    for name, data in files.items():
        label = where(name)
        if name in TEXT_FILES or name.endswith(".jinja"):
            _text(data, label)
        elif name == SENTENCEPIECE_FILE:
            parsed(name, data, label)
        elif name in _JSON_SHAPES:
            parsed(name, data, label)


# --------------------------------------------------------------------------------------------- parse once

_CACHE_SIZE = 4  # documents kept: a checkpoint's tokenizer.json and friends, or two checkpoints' worth
_cache: OrderedDict[int, tuple[bytes, object]] = OrderedDict()


def parsed(name: str, data: bytes, label: str):
    """The checked content of tokenizer file `name`: a JSON object of its expected shape, or for
    tokenizer.model a SentencePieceModel. Parsed and checked once per bytes object (the entry holds the bytes,
    so the id cannot be reused while it is cached); callers must not modify what they get."""
    entry = _cache.get(id(data))
    if entry is not None and entry[0] is data:
        _cache.move_to_end(id(data))
        return entry[1]
    if name == SENTENCEPIECE_FILE:
        content = sentencepiece_model.parse(data, label)
    else:
        content = parse_json(data, label)
        if not isinstance(content, dict):
            raise ConvertError(f"{label}: not a JSON object")
        _JSON_SHAPES.get(name, _any_object)(content, label)
    _cache[id(data)] = (data, content)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return content


def clear_cache() -> None:
    _cache.clear()


def _text(data: bytes, label: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{label}: not UTF-8 text (byte {exc.start})") from None


# ------------------------------------------------------------------------------------------ shape of fields


def _bad(label: str, field: str, value, expected: str) -> ConvertError:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return ConvertError(f"{label}: {field} is {text}, expected {expected}")


def _first_bad(items: list, accepts: Callable[[object], bool]) -> int | None:
    """The index of the first item `accepts` refuses (an index: the item itself may be None)."""
    return next((i for i, item in enumerate(items) if not accepts(item)), None)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(document: dict, field: str, label: str, accepts: Callable[[object], bool], expected: str) -> None:
    value = document.get(field)
    if value is not None and not accepts(value):
        raise _bad(label, field, value, expected)


def _token_text(value) -> bool:
    """A special token as tokenizer_config.json spells it: its text, or {"content": text, ...}."""
    return isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)


def _ids(value) -> bool:
    return _is_id(value) or isinstance(value, list) and all(_is_id(v) for v in value)


def _templates(value) -> bool:
    """One chat template, or a list of named ones ({"name", "template"})."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value)


def _string_to_id(value) -> bool:
    """An object of token -> id; checked over all values at once (Llama 3's vocab has 128k)."""
    if not isinstance(value, dict):
        return False
    ids = value.values()
    return not ids or set(map(type, ids)) == {int} and min(ids) >= 0


def _merge(value) -> bool:
    """"a b", or ["a", "b"] (tokenizers >= 0.20)."""
    if isinstance(value, str):
        return " " in value
    return isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)


def _all_merges(merges: list) -> bool:
    """Whether every merge is of _merge's shape, decided in C over the whole list (a Python call per merge is
    most of the time of a real tokenizer's 280k merges; BENCHMARKS.md, design measurements). Only a list that
    fails is walked item by item."""
    kinds = set(map(type, merges))
    if kinds == {list}:
        return (set(map(len, merges)) == {2}
                and set(map(type, itertools.chain.from_iterable(merges))) == {str})
    if kinds == {str}:
        return all(map(operator.contains, merges, itertools.repeat(" ")))
    return not merges


def _added_token(value) -> bool:
    return (isinstance(value, dict) and _is_id(value.get("id")) and isinstance(value.get("content"), str)
            and isinstance(value.get("special", False), bool))


# ------------------------------------------------------------------------------------------- each file


def _tokenizer_json(document: dict, label: str) -> None:
    model = document.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("type", ""), str):
        raise _bad(label, "model", model, "an object with a 'type'")
    if model.get("type") == "BPE":
        if not _string_to_id(model.get("vocab")):
            raise _bad(label, "model.vocab", model.get("vocab"), "an object of token -> id")
        merges = model.get("merges", [])
        if not isinstance(merges, list):
            raise _bad(label, "model.merges", merges, "a list")
        bad = None if _all_merges(merges) else _first_bad(merges, _merge)
        if bad is not None:
            raise _bad(label, "a merge in model.merges", merges[bad], '"left right" or ["left", "right"]')
    added = document.get("added_tokens", [])
    if not isinstance(added, list):
        raise _bad(label, "added_tokens", added, "a list")
    bad = _first_bad(added, _added_token)
    if bad is not None:
        raise _bad(label, "an entry of added_tokens", added[bad], 'an object with an integer "id" and a "content" string')
    _pre_tokenizer(document.get("pre_tokenizer"), label)
    _optional(document, "post_processor", label, lambda v: isinstance(v, dict), "an object")


def _pre_tokenizer(value, label: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad(label, "pre_tokenizer", value, "an object")
    steps = value.get("pretokenizers", []) if value.get("type") == "Sequence" else [value]
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise _bad(label, "pre_tokenizer.pretokenizers", steps, "a list of objects")
    for step in steps:
        _optional(step, "pattern", label, lambda v: isinstance(v, dict), "an object")


def _added_tokens_decoder(value) -> bool:
    """tokenizer_config.json's {"<id>": {"content": text, "special": bool, ...}}."""
    return isinstance(value, dict) and all(
        isinstance(key, str) and key.isdigit() and _token_text(token) and isinstance(token, dict)
        and isinstance(token.get("special", False), bool) for key, token in value.items())


def _tokenizer_config(document: dict, label: str) -> None:
    _optional(document, "added_tokens_decoder", label, _added_tokens_decoder,
              'an object of "<id>" -> {"content": text, "special": true or false}')
    for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
        _optional(document, field, label, _token_text, 'a token text or {"content": text}')
    for field in ("add_bos_token", "add_eos_token"):
        _optional(document, field, label, lambda v: isinstance(v, bool), "true or false")
    _optional(document, "chat_template", label, _templates, "a template string or a list of named templates")


def _generation_config(document: dict, label: str) -> None:
    for field in ("bos_token_id", "eos_token_id"):
        _optional(document, field, label, _ids, "a token id or a list of them")


def _chat_template_json(document: dict, label: str) -> None:
    _optional(document, "chat_template", label, _templates, "a template string or a list of named templates")


def _string_to_id_file(document: dict, label: str) -> None:
    if not _string_to_id(document):
        raise ConvertError(f"{label}: expected an object of token -> id")


def _any_object(document: dict, label: str) -> None:
    pass


_JSON_SHAPES: dict[str, Callable[[dict, str], None]] = {
    "tokenizer.json": _tokenizer_json,
    "tokenizer_config.json": _tokenizer_config,
    "generation_config.json": _generation_config,
    "chat_template.json": _chat_template_json,
    "special_tokens_map.json": _any_object,
    "added_tokens.json": _string_to_id_file,
    "vocab.json": _string_to_id_file,
}
