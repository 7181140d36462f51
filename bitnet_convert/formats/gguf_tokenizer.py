"""The tokenizer as GGUF metadata (docs/formats.md §8), and back to tokenizer.json + tokenizer_config.json.

Only byte-level BPE tokenizers (`tokenizer.ggml.model = "gpt2"`) are carried: that is what every BitNet
checkpoint ships (2B4T has Llama 3's). llama.cpp does not run the tokenizer.json pre-tokenizer; it picks its own
from `tokenizer.ggml.pre`, so the pre-tokenizer's regex decides the name, from the table below. An unknown regex
is refused: llama.cpp would split text differently and every id could change.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from gguf import GGUFWriter, Keys, TokenType

from bitnet_core.errors import ConvertError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    regex: str
    ignore_merges: bool  # BPE option: a whole pre-token found in the vocab is one token (Llama 3; llama.cpp too)

    def to_json(self) -> dict:
        if self.regex == GPT2_REGEX:  # the regex built into tokenizers' ByteLevel
            return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp runs under that name (src/llama-vocab.cpp). Note "gpt-2":
# llama.cpp refuses "gpt2" as an unknown pre-tokenizer.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama-bpe": PreTokenizer(LLAMA3_REGEX, ignore_merges=True),
    "gpt-2": PreTokenizer(GPT2_REGEX, ignore_merges=False),
}
# Other names llama.cpp gives the same pre-tokenizer, accepted when reading foreign files.
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe"}

# Texts of end-of-turn tokens llama.cpp should stop on (tokenizer.ggml.eot_token_id).
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
PAD_TOKEN = "[PAD{}]"  # fills ids the tokenizer lacks when the embedding has more rows (type UNUSED)


@dataclasses.dataclass
class GGUFVocab:
    """Everything a GGUF file says about the tokenizer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    model: str = "gpt2"

    def add_to(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for value, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                           (self.eot_id, writer.add_eot_token_id)):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _token_text(value) -> str | None:
    if isinstance(value, Mapping):  # {"content": "<|eot_id|>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def _pre_name(pre_tokenizer: Mapping | None, where: str) -> str:
    """The llama.cpp pre-tokenizer equal to tokenizer.json's (ByteLevel, alone or after one regex Split)."""
    steps = [] if pre_tokenizer is None else (
        pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    )
    regexes, byte_level = [], None
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated":
            regexes.append(step["pattern"]["Regex"])
        elif step.get("type") == "ByteLevel":
            byte_level = step
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        else:
            raise ConvertError(f"{where}: pre-tokenizer step {step.get('type')!r} has no llama.cpp equivalent")
    if byte_level is None or byte_level.get("add_prefix_space") or len(regexes) != 1:
        raise ConvertError(f"{where}: only byte-level BPE with one split regex can go to GGUF")
    for name, spec in PRE_TOKENIZERS.items():
        if spec.regex == regexes[0]:
            return name
    raise ConvertError(f"{where}: pre-tokenizer regex {regexes[0][:60]!r}... matches no llama.cpp pre-tokenizer")


def _template_specials(tok: dict, where: str) -> tuple[int | None, int | None]:
    """The special token the post-processor puts in front of / after a text (None if none): asks `tokenizers`.

    It builds the tokenizer with a one-token vocabulary ("a", which it then encodes) and no merges: the
    post-processor and added tokens are what decide, and a real-size vocabulary (Llama 3: 128k tokens, 280k
    merges) would take most of a second to build."""
    from tokenizers import Tokenizer

    model = tok.get("model") or {}
    one = {"a": (model.get("vocab") or {}).get("a", 0)}
    reduced = dict(tok, model=dict(model, vocab=one, merges=[]))
    try:
        enc = Tokenizer.from_str(json.dumps(reduced)).encode("a", add_special_tokens=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for files it cannot build
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConvertError(f"{where}: tokenizer.json is not one the tokenizers library loads: {first}") from None
    ids, special = enc.ids, enc.special_tokens_mask
    first = ids[0] if ids and special[0] else None
    last = ids[-1] if len(ids) > 1 and special[-1] else None
    return first, last


def _check_merges(merges: list[str], vocab: Mapping[str, int], where: str) -> None:
    """Every merge joins two tokens of the vocabulary, as the tokenizers library requires when it loads the file
    (here rather than by building the whole tokenizer: 280k merges take most of a second to build)."""
    for merge in merges:
        parts = merge.split(" ", 1)
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise ConvertError(f"{where}: tokenizer.json is not one the tokenizers library loads: merge {merge!r} "
                               "names a token that is not in the vocabulary")


def vocab_from_files(files: Mapping[str, bytes], config: Mapping, n_vocab: int, where: str) -> GGUFVocab | None:
    """GGUF tokenizer metadata from a checkpoint's tokenizer files; None when it has no tokenizer.json."""
    if "tokenizer.json" not in files:
        return None
    tok_json = files["tokenizer.json"].decode()
    tok = json.loads(tok_json)
    tok_config = json.loads(files.get("tokenizer_config.json", b"{}"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConvertError(f"{where}: tokenizer model {model.get('type')!r} is not a byte-level BPE (GGUF 'gpt2')")
    pre = _pre_name(tok.get("pre_tokenizer"), where)

    by_id: dict[int, tuple[str, int]] = {i: (text, TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ConvertError(f"{where}: tokenizer has id {max(by_id)} but the embedding has only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (PAD_TOKEN.format(i), TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    _check_merges(merges, model["vocab"], where)

    ids = {text: i for i, text in enumerate(tokens)}
    bos_id = ids.get(_token_text(tok_config.get("bos_token")), config.get("bos_token_id"))
    eos_text = _token_text(tok_config.get("eos_token"))
    eos_id = ids[eos_text] if eos_text in ids else config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    eot_id = next((ids[t] for t in EOT_TOKENS if t in ids), None)
    prefix, suffix = _template_specials(tok, where)
    bos_id = prefix if bos_id is None else bos_id  # Llama 3 names BOS only in its post-processor template
    add_bos, add_eos = prefix is not None and prefix == bos_id, suffix is not None and suffix == eos_id
    template = tok_config.get("chat_template")
    if template is None and "chat_template.jinja" in files:  # transformers 5 saves it beside the config
        template = files["chat_template.jinja"].decode()
    if not isinstance(template, str):  # a list of named templates: keep the default one
        template = next((t["template"] for t in template or [] if t.get("name") == "default"), None)
    return GGUFVocab(pre, tokens, types, merges, bos_id, eos_id, eot_id, add_bos, add_eos, template)


def vocab_from_fields(field, where: str, n_vocab: int | None = None) -> GGUFVocab | None:
    """Read GGUFVocab back; `field(key)` returns a key's value or None.

    Every key is checked for its type, and every length that must agree does (a token_type array shorter
    than the tokens once made zip() drop the rest): one type (and score) per token, one token per embedding
    row (`n_vocab`: llama.cpp's vocabulary is the token list), ids inside the vocabulary, merges of two parts."""
    tokens = _key(field, Keys.Tokenizer.LIST, where, _strings, "an array of strings")
    if tokens is None:
        return None
    model = field(Keys.Tokenizer.MODEL)
    if model != "gpt2":
        raise ConvertError(f"{where}: tokenizer model {str(model)[:40]!r} is not supported (only byte-level BPE, 'gpt2')")
    if n_vocab is not None and len(tokens) != n_vocab:
        raise ConvertError(f"{where}: {Keys.Tokenizer.LIST} holds {len(tokens)} tokens, but token_embd.weight has "
                           f"{n_vocab} rows")
    types = _per_token(field, Keys.Tokenizer.TOKEN_TYPE, where, tokens, _token_type, "token types (0..6)")
    _per_token(field, Keys.Tokenizer.SCORES, where, tokens, _number, "numbers")
    pre = _key(field, Keys.Tokenizer.PRE, where, _is_text, "a string") or "default"
    return GGUFVocab(
        pre=PRE_ALIASES.get(pre, pre),
        tokens=tokens,
        token_types=[int(TokenType.NORMAL)] * len(tokens) if types is None else types,
        merges=_key(field, Keys.Tokenizer.MERGES, where, _merges, 'an array of "left right" strings') or [],
        bos_id=_token_id(field, Keys.Tokenizer.BOS_ID, where, len(tokens)),
        eos_id=_token_id(field, Keys.Tokenizer.EOS_ID, where, len(tokens)),
        eot_id=_token_id(field, Keys.Tokenizer.EOT_ID, where, len(tokens)),
        add_bos=bool(_key(field, Keys.Tokenizer.ADD_BOS, where, _is_bool, "a bool")),
        add_eos=bool(_key(field, Keys.Tokenizer.ADD_EOS, where, _is_bool, "a bool")),
        chat_template=_key(field, Keys.Tokenizer.CHAT_TEMPLATE, where, _is_text, "a string"),
    )


def _key(field, key: str, where: str, accepts, expected: str):
    """field(key) when absent (None) or accepted, else one error naming the key."""
    value = field(key)
    if value is not None and not accepts(value):
        shown = f"an array of {len(value)}" if isinstance(value, list) else repr(value)[:40]
        raise ConvertError(f"{where}: key {key} is {shown}, expected {expected}")
    return value


def _per_token(field, key: str, where: str, tokens: list[str], accepts, items: str) -> list | None:
    """An array with one entry per token (token types, scores), or None when absent."""
    values = _key(field, key, where, lambda v: isinstance(v, list) and all(map(accepts, v)), f"an array of {items}")
    if values is not None and len(values) != len(tokens):
        raise ConvertError(f"{where}: {key} has {len(values)} entries for {len(tokens)} tokens")
    return values


def _token_id(field, key: str, where: str, n_tokens: int) -> int | None:
    return _key(field, key, where, lambda v: _is_integer(v) and 0 <= v < n_tokens, f"a token id in 0..{n_tokens - 1}")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_text(value) -> bool:
    return isinstance(value, str)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token_type(value) -> bool:
    return _is_integer(value) and 0 <= value <= max(TokenType)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _merges(value) -> bool:
    return _strings(value) and all(" " in m for m in value)


def tokenizer_files(vocab: GGUFVocab, model_max_length: int, where: str) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json that encode text to the same ids as llama.cpp does."""
    if vocab.pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{where}: pre-tokenizer {vocab.pre!r} has no tokenizer.json equivalent here")
    spec = PRE_TOKENIZERS[vocab.pre]
    model_vocab, added = {}, []
    for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True)):  # one type per token
        if kind == TokenType.UNUSED and text == PAD_TOKEN.format(i):
            continue
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == TokenType.CONTROL})
        else:
            model_vocab[text] = i

    def special(i):
        return [{"SpecialToken": {"id": vocab.tokens[i], "type_id": 0}}]

    bos = special(vocab.bos_id) if vocab.add_bos and vocab.bos_id is not None else []
    eos = special(vocab.eos_id) if vocab.add_eos and vocab.eos_id is not None else []
    used = {vocab.tokens[i]: i for i in ([vocab.bos_id] if bos else []) + ([vocab.eos_id] if eos else [])}
    seq = lambda name: [{"Sequence": {"id": name, "type_id": 0}}]  # noqa: E731
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": spec.to_json(),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": bos + seq("A") + eos,
            "pair": bos + seq("A") + eos + bos + seq("B") + eos,
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in used.items()},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": spec.ignore_merges, "vocab": model_vocab,
            "merges": [m.split(" ", 1) for m in vocab.merges],
        },
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else None,
        "eos_token": vocab.tokens[vocab.eos_id] if vocab.eos_id is not None else None,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if vocab.chat_template:
        tokenizer_config["chat_template"] = vocab.chat_template
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=1).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config, ensure_ascii=False, indent=2).encode(),
    }
