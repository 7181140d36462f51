"""The tokenizer as GGUF metadata (docs/formats.md §8), and back to tokenizer files.

Two tokenizer models travel, the two BitNet checkpoints ship:
* byte-level BPE from tokenizer.json (`tokenizer.ggml.model = "gpt2"`): 2B4T (Llama 3's), Falcon3 and
  Falcon-E, HF1BitLLM. llama.cpp does not run the tokenizer.json pre-tokenizer; it picks its own from
  `tokenizer.ggml.pre`, so the pre-tokenizer's regex decides the name, from the table below. An unknown regex is
  refused: llama.cpp would split text differently and every id could change.
* SentencePiece BPE from tokenizer.model (`"llama"`): 1bitLLM's bitnet_b1_58-large / -3B (Llama 2's). Pieces,
  scores and piece types go over as they are; settings llama.cpp's SPM tokenizer does not implement (a unigram
  model, a normalizer, whitespace collapsing) are refused for the same reason.

Speed matters at real size (128k tokens, 280k merges): the files are parsed once (tokenizer_files.parsed, shared
with the check made when the checkpoint was read) and every per-token or per-merge check runs over whole lists.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
from collections.abc import Mapping

from gguf import GGUFWriter, Keys, TokenType

from bitnet_convert.formats import sentencepiece_model as spm
from bitnet_convert.formats import tokenizer_files as tf
from bitnet_core import gcpause
from bitnet_core.errors import ConvertError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Qwen2's and Qwen3's (tokenizer.json): Llama 3's with single digits, `\p{N}` for `\p{N}{1,3}`
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
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


# tokenizer.ggml.pre written -> the pre-tokenizer llama.cpp runs under that name (src/llama-vocab.cpp). The name
# written must be one every runtime knows: llama.cpp (as vendored by llama-cpp-python 0.3.36), ik_llama.cpp and
# bitnet.cpp all run LLAMA3 for "llama-bpe". Note "gpt-2": llama.cpp refuses "gpt2" as an unknown pre-tokenizer.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama-bpe": PreTokenizer(LLAMA3_REGEX, ignore_merges=True),
    "gpt-2": PreTokenizer(GPT2_REGEX, ignore_merges=False),
    # llama.cpp's QWEN2 runs this regex (rewritten without `(?i:`), merges never skipped; bitnet.cpp's embedding
    # converter names BitNet-embedding-0.6B's tokenizer so
    "qwen2": PreTokenizer(QWEN2_REGEX, ignore_merges=False),
}
# Other names runtimes give the same pre-tokenizer, accepted when reading foreign files. Falcon3 and Falcon-E
# split text with Llama 3's regex, and every runtime maps their names to its LLAMA3 pre-tokenizer where it knows
# them at all, so their tokenizers are written as "llama-bpe":
#   "falcon3"    llama.cpp, ik_llama.cpp, bitnet.cpp (its converter writes it for Falcon3)
#   "falcon-h1"  llama.cpp, ik_llama.cpp (Falcon-E's tokenizer is Falcon-H1-0.5B's: same convert-script hash)
#   "falcon_e"   bitnet.cpp (its converter writes it for Falcon-E); unknown to llama.cpp, which refuses the file
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "falcon-h1": "llama-bpe",
               "falcon_e": "llama-bpe"}

# tokenizer.ggml.model -> what it is
MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}

# Texts of end-of-turn tokens llama.cpp should stop on (tokenizer.ggml.eot_token_id).
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
PAD_TOKEN = "[PAD{}]"  # fills ids the tokenizer lacks when the embedding has more rows (type UNUSED)
# SentencePiece score of tokens that are not pieces (added tokens, padding): below every real piece, so llama.cpp's
# score-driven merging never builds them (llama.cpp's own converter uses the same value)
NOT_A_PIECE_SCORE = -1000.0
SPM_DEFAULT_PRE = "default"  # llama.cpp ignores the pre-tokenizer of SPM vocabularies; its converter writes this


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
    scores: list[float] | None = None  # SentencePiece scores, one per token ("llama")
    unk_id: int | None = None
    pad_id: int | None = None
    add_space_prefix: bool | None = None  # SentencePiece's add_dummy_prefix ("llama")
    add_sep: bool | None = None  # whether a separator goes between a pair's texts (None: not said)

    def add_to(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges or self.model == "gpt2":  # llama.cpp's BPE needs the key; SentencePiece has none
            writer.add_token_merges(self.merges)
        for value, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                           (self.eot_id, writer.add_eot_token_id), (self.unk_id, writer.add_unk_token_id),
                           (self.pad_id, writer.add_pad_token_id)):
            if value is not None:
                add(value)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_sep is not None:
            writer.add_add_sep_token(self.add_sep)
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


def _template_specials(tok: dict, where: str) -> tuple[int | None, int | None, list[int]]:
    """The special token the post-processor puts in front of / after a text (None if none), and those it puts
    between the two texts of a pair: asks `tokenizers`.

    It builds the tokenizer with a one-token vocabulary ("a", which it then encodes) and no merges: the
    post-processor and added tokens are what decide, and a real-size vocabulary (Llama 3: 128k tokens, 280k
    merges) would take most of a second to build."""
    from tokenizers import Tokenizer

    model = tok.get("model") or {}
    one = {"a": (model.get("vocab") or {}).get("a", 0)}
    reduced = dict(tok, model=dict(model, vocab=one, merges=[]))
    try:
        tokenizer = Tokenizer.from_str(json.dumps(reduced))
        enc, pair = tokenizer.encode("a", add_special_tokens=True), tokenizer.encode("a", "a", add_special_tokens=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for files it cannot build
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConvertError(f"{where}: tokenizer.json is not one the tokenizers library loads: {first}") from None
    ids, special = enc.ids, enc.special_tokens_mask
    first = ids[0] if ids and special[0] else None
    last = ids[-1] if len(ids) > 1 and special[-1] else None
    texts = [i for i, sequence in enumerate(pair.sequence_ids) if sequence is not None]
    between = [pair.ids[i] for i in range(texts[0] + 1, texts[-1]) if pair.sequence_ids[i] is None] if texts else []
    return first, last, between


def _gguf_merges(merges: list, vocab: Mapping[str, int], where: str) -> list[str]:
    """The merges as GGUF's "left right" strings, after checking, over the whole list at once, that each joins
    two tokens of the vocabulary (as the tokenizers library requires when it loads the file) and that no part
    holds a space (llama.cpp cuts "left right" at its first space)."""
    kinds = set(map(type, merges))  # tokenizer_files checked each is "left right" or ["left", "right"]
    if kinds == {str}:
        pairs, joined = list(map(str.split, merges, itertools.repeat(" "), itertools.repeat(1))), merges
    else:
        pairs = merges if kinds <= {list} else [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
        joined = list(map(" ".join, pairs))
    if not all(map(vocab.__contains__, itertools.chain.from_iterable(pairs))):
        bad = next(" ".join(pair) for pair in pairs if not set(pair) <= vocab.keys())
        raise ConvertError(f"{where}: tokenizer.json is not one the tokenizers library loads: merge {bad!r} "
                           "names a token that is not in the vocabulary")
    # a merge part is a vocabulary token: when no token holds a space (byte-level BPE never has one), no part does
    if any(map(operator.contains, vocab, itertools.repeat(" "))):
        bad = next((" ".join(pair) for pair in pairs if any(" " in part for part in pair)), None)
        if bad is not None:
            raise ConvertError(f"{where}: merge {bad!r} joins a token holding a space, which GGUF's \"left right\" "
                               "merges cannot carry")
    return joined


def _chat_template(tok_config: Mapping, files: Mapping[str, bytes]) -> str | None:
    template = tok_config.get("chat_template")
    if template is None and "chat_template.jinja" in files:  # transformers 5 saves it beside the config
        template = files["chat_template.jinja"].decode()
    if not isinstance(template, str):  # a list of named templates: keep the default one
        template = next((t["template"] for t in template or [] if t.get("name") == "default"), None)
    return template


def _first_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else (value if isinstance(value, int) else None)


def _is_byte_level_bpe(tok: Mapping) -> bool:
    """Whether tokenizer.json is the byte-level BPE GGUF's "gpt2" model carries (Llama 2's tokenizer.json, BPE
    with byte_fallback over a Metaspace, is not: its tokenizer.model is)."""
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback")


def vocab_from_files(files: Mapping[str, bytes], config: Mapping, n_vocab: int, where: str) -> GGUFVocab | None:
    """GGUF tokenizer metadata from a checkpoint's tokenizer files; None when it has neither tokenizer.json
    nor tokenizer.model. A byte-level BPE tokenizer.json wins; else tokenizer.model; else tokenizer.json's model
    is refused with its reason."""
    with gcpause.paused():  # ~1M strings and lists for a Llama-3 tokenizer, no cycles among them
        tok = _parsed(files, "tokenizer.json", where) if "tokenizer.json" in files else None
        tok_config = _parsed(files, "tokenizer_config.json", where) if "tokenizer_config.json" in files else {}
        if tok is not None and (_is_byte_level_bpe(tok) or tf.SENTENCEPIECE_FILE not in files):
            return _bpe_vocab(tok, tok_config, files, config, n_vocab, where)
        if tf.SENTENCEPIECE_FILE in files:
            return _spm_vocab(_parsed(files, tf.SENTENCEPIECE_FILE, where), tok_config, files, config, n_vocab,
                              where)
        return None


def _parsed(files: Mapping[str, bytes], name: str, where: str):
    return tf.parsed(name, files[name], f"{where}: {name}")


def _bpe_vocab(tok: dict, tok_config: Mapping, files, config: Mapping, n_vocab: int, where: str) -> GGUFVocab:
    model = tok.get("model", {})
    if not _is_byte_level_bpe(tok):
        raise ConvertError(f"{where}: tokenizer model {model.get('type')!r} is not a byte-level BPE (GGUF 'gpt2')")
    pre = _pre_name(tok.get("pre_tokenizer"), where)
    vocab = model["vocab"]
    added = tok.get("added_tokens", [])
    top = max(max(vocab.values(), default=-1), max((a["id"] for a in added), default=-1))
    if top >= n_vocab:
        raise ConvertError(f"{where}: tokenizer has id {top} but the embedding has only {n_vocab} rows")
    tokens: list = [None] * n_vocab
    types = [int(TokenType.NORMAL)] * n_vocab
    list(map(tokens.__setitem__, vocab.values(), vocab.keys()))  # in C: 128k tokens in a few ms
    for token in added:
        tokens[token["id"]] = token["content"]
        types[token["id"]] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
    _pad_missing(tokens, types)
    merges = _gguf_merges(model.get("merges", []), vocab, where)

    by_text = {**vocab, **{a["content"]: a["id"] for a in added}}
    bos_id = by_text.get(_token_text(tok_config.get("bos_token")), config.get("bos_token_id"))
    eos_text = _token_text(tok_config.get("eos_token"))
    eos_id = by_text[eos_text] if eos_text in by_text else _first_id(config.get("eos_token_id"))
    eot_id = next((by_text[t] for t in EOT_TOKENS if t in by_text), None)
    prefix, suffix, between = _template_specials(tok, where)
    bos_id = prefix if bos_id is None else bos_id  # Llama 3 names BOS only in its post-processor template
    add_bos, add_eos = prefix is not None and prefix == bos_id, suffix is not None and suffix == eos_id
    # As llama.cpp's converter decides it: said where a pair's texts have a special token between them (Llama 3:
    # BOS), true where that is EOS (a separator, as BERT's)
    add_sep = eos_id in between[:2] if between else None
    return GGUFVocab(pre, tokens, types, merges, bos_id, eos_id, eot_id, add_bos, add_eos,
                     _chat_template(tok_config, files), add_sep=add_sep)


def _pad_missing(tokens: list, types: list[int], scores: list[float] | None = None) -> None:
    """Ids no token claims become [PAD<id>] of type UNUSED (the embedding has more rows than the tokenizer)."""
    for i in [i for i, text in enumerate(tokens) if text is None]:
        tokens[i], types[i] = PAD_TOKEN.format(i), int(TokenType.UNUSED)
        if scores is not None:
            scores[i] = NOT_A_PIECE_SCORE


# SentencePiece settings llama.cpp's SPM tokenizer cannot follow: (attribute, value refused, why)
SPM_REFUSED = (
    ("remove_extra_whitespaces", True, "it collapses runs of spaces, which llama.cpp keeps"),
    ("escape_whitespaces", False, "it keeps spaces as spaces; llama.cpp always writes them as U+2581"),
    ("treat_whitespace_as_suffix", True, "it puts U+2581 after words; llama.cpp puts it in front"),
    ("byte_fallback", False, "unknown characters become <unk>; llama.cpp splits them into <0xXX> byte pieces"),
)


def _check_spm(model: spm.SentencePieceModel, where: str) -> None:
    label = f"{where}: tokenizer.model"
    if model.model_type != spm.ModelType.BPE:
        known = model.model_type in spm.ModelType._value2member_map_
        kind = spm.ModelType(model.model_type).name if known else f"type-{model.model_type}"
        raise ConvertError(f"{label}: a SentencePiece {kind} model; llama.cpp's 'llama' tokenizer runs BPE models only")
    if model.precompiled_charsmap:
        raise ConvertError(f"{label}: its normalizer {model.normalizer_name or 'rules'!r} rewrites text before "
                           "splitting, which llama.cpp's 'llama' tokenizer does not")
    for attribute, refused, why in SPM_REFUSED:
        if getattr(model, attribute) == refused:
            raise ConvertError(f"{label}: {attribute} is {str(refused).lower()}: {why}")
    if model.types.count(spm.PieceType.UNKNOWN) != 1:
        raise ConvertError(f"{label}: holds {model.types.count(spm.PieceType.UNKNOWN)} unknown pieces, expected 1")


def _spm_vocab(model: spm.SentencePieceModel, tok_config: Mapping, files, config: Mapping, n_vocab: int,
               where: str) -> GGUFVocab:
    """A SentencePiece BPE model as llama.cpp's 'llama' vocabulary: the pieces with their scores and types, then
    the added tokens of added_tokens.json and tokenizer_config.json's added_tokens_decoder (over a piece of the
    same id but another text, as llama.cpp's converter does), padding to the embedding's rows."""
    _check_spm(model, where)
    if len(model.pieces) > n_vocab:
        raise ConvertError(f"{where}: tokenizer.model has {len(model.pieces)} pieces but the embedding has only "
                           f"{n_vocab} rows")
    extra = n_vocab - len(model.pieces)
    tokens, scores = model.pieces + [None] * extra, model.scores + [NOT_A_PIECE_SCORE] * extra
    types = [int(t) for t in model.types] + [int(TokenType.UNUSED)] * extra
    for i, text, special in _added_tokens(files, tok_config, where):
        if i >= n_vocab:
            raise ConvertError(f"{where}: added token {text!r} has id {i} but the embedding has only {n_vocab} rows")
        if i < len(model.pieces) and text == model.pieces[i]:
            continue  # the piece itself (Llama 2 lists <unk>, <s>, </s>): its own type says what it is
        tokens[i], scores[i] = text, NOT_A_PIECE_SCORE
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    _pad_missing(tokens, types, scores)

    by_text = {text: i for i, text in enumerate(tokens)}

    def special_id(field: str, piece_id: int, config_key: str) -> int | None:
        text = _token_text(tok_config.get(field))
        if text in by_text:
            return by_text[text]
        if 0 <= piece_id < len(model.pieces):
            return piece_id
        return _first_id(config.get(config_key))

    bos_id = special_id("bos_token", model.bos_id, "bos_token_id")
    eos_id = special_id("eos_token", model.eos_id, "eos_token_id")
    return GGUFVocab(
        pre=SPM_DEFAULT_PRE, tokens=tokens, token_types=types, merges=[], model="llama", scores=scores,
        bos_id=bos_id, eos_id=eos_id, eot_id=next((by_text[t] for t in EOT_TOKENS if t in by_text), None),
        unk_id=model.types.index(spm.PieceType.UNKNOWN), pad_id=special_id("pad_token", model.pad_id, "pad_token_id"),
        # transformers' LlamaTokenizer adds BOS and not EOS unless its config says otherwise
        add_bos=tok_config.get("add_bos_token", True), add_eos=tok_config.get("add_eos_token", False),
        add_space_prefix=model.add_dummy_prefix, chat_template=_chat_template(tok_config, files),
    )


def _added_tokens(files: Mapping[str, bytes], tok_config: Mapping, where: str):
    """(id, text, special) of the tokens added beside tokenizer.model: added_tokens.json ({text: id}, not
    special), then tokenizer_config.json's added_tokens_decoder ({"id": {"content", "special"}})."""
    if "added_tokens.json" in files:
        for text, i in _parsed(files, "added_tokens.json", where).items():
            yield i, text, False
    for key, token in (tok_config.get("added_tokens_decoder") or {}).items():
        yield int(key), token["content"], bool(token.get("special"))


def vocab_from_fields(field, where: str, n_vocab: int | None = None) -> GGUFVocab | None:
    """Read GGUFVocab back; `field(key)` returns a key's value or None.

    Every key is checked for its type, and every length that must agree does (a token_type array shorter
    than the tokens once made zip() drop the rest): one type (and score) per token, one token per embedding
    row (`n_vocab`: llama.cpp's vocabulary is the token list), ids inside the vocabulary, merges of two parts."""
    tokens = _key(field, Keys.Tokenizer.LIST, where, _strings, "an array of strings")
    if tokens is None:
        return None
    model = field(Keys.Tokenizer.MODEL)
    if model not in MODELS:
        supported = ", ".join(f"{kind} ({name!r})" for name, kind in MODELS.items())
        raise ConvertError(f"{where}: tokenizer model {str(model)[:40]!r} is not supported (only {supported})")
    if n_vocab is not None and len(tokens) != n_vocab:
        raise ConvertError(f"{where}: {Keys.Tokenizer.LIST} holds {len(tokens)} tokens, but token_embd.weight has "
                           f"{n_vocab} rows")
    types = _per_token(field, Keys.Tokenizer.TOKEN_TYPE, where, tokens, _token_type, "token types (0..6)")
    scores = _per_token(field, Keys.Tokenizer.SCORES, where, tokens, _number, "numbers")
    pre = _key(field, Keys.Tokenizer.PRE, where, _is_text, "a string") or "default"
    ids = {name: _token_id(field, key, where, len(tokens)) for name, key in (
        ("bos_id", Keys.Tokenizer.BOS_ID), ("eos_id", Keys.Tokenizer.EOS_ID), ("eot_id", Keys.Tokenizer.EOT_ID),
        ("unk_id", Keys.Tokenizer.UNK_ID), ("pad_id", Keys.Tokenizer.PAD_ID))}
    return GGUFVocab(
        pre=PRE_ALIASES.get(pre, pre),
        tokens=tokens,
        token_types=[int(TokenType.NORMAL)] * len(tokens) if types is None else types,
        merges=_key(field, Keys.Tokenizer.MERGES, where, _merges, 'an array of "left right" strings') or [],
        add_bos=bool(_key(field, Keys.Tokenizer.ADD_BOS, where, _is_bool, "a bool")),
        add_eos=bool(_key(field, Keys.Tokenizer.ADD_EOS, where, _is_bool, "a bool")),
        chat_template=_key(field, Keys.Tokenizer.CHAT_TEMPLATE, where, _is_text, "a string"),
        model=model,
        scores=None if scores is None else [float(v) for v in scores],
        add_space_prefix=_key(field, Keys.Tokenizer.ADD_PREFIX, where, _is_bool, "a bool"),
        **ids,
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
    values = _key(field, key, where, lambda v: isinstance(v, list) and _all(v, accepts), f"an array of {items}")
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


def _all(values: list, accepts) -> bool:
    """all(map(accepts, values)), answered from the set of element types when that settles it (a 128k-token
    list of one type costs a few ms instead of one Python call per element)."""
    kinds = set(map(type, values))
    if kinds <= {str}:
        return accepts is _is_text or all(map(accepts, values))
    if kinds <= {int, float} and accepts is _number:
        return True
    if kinds == {int} and accepts is _token_type:
        return min(values) >= 0 and max(values) <= max(TokenType)
    return all(map(accepts, values))


def _strings(value) -> bool:
    return isinstance(value, list) and _all(value, _is_text)


def _merges(value) -> bool:
    return _strings(value) and all(map(operator.contains, value, itertools.repeat(" ")))


def tokenizer_files(vocab: GGUFVocab, model_max_length: int, where: str) -> dict[str, bytes]:
    """Tokenizer files that encode text to the same ids as llama.cpp does: tokenizer.json +
    tokenizer_config.json for byte-level BPE, tokenizer.model + tokenizer_config.json for SentencePiece."""
    if vocab.model == "llama":
        return _sentencepiece_files(vocab, model_max_length, where)
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


def _sentencepiece_files(vocab: GGUFVocab, model_max_length: int, where: str) -> dict[str, bytes]:
    """tokenizer.model (every token up to the last that is not padding, as a piece of its own type) and a
    tokenizer_config.json for transformers' LlamaTokenizer with the same specials and flags. `legacy` is true:
    llama.cpp puts a space in front of the text after every special token, as the legacy Llama tokenizer does."""
    unknown = [i for i, kind in enumerate(vocab.token_types) if kind == TokenType.UNKNOWN]
    if len(unknown) != 1:
        raise ConvertError(f"{where}: a SentencePiece vocabulary needs one unknown token, this one has {len(unknown)}")
    count = len(vocab.tokens)
    while count and _is_padding(vocab, count - 1):
        count -= 1
    scores = vocab.scores if vocab.scores is not None else [0.0] * len(vocab.tokens)
    # GGUF's UNDEFINED (0) has no SentencePiece counterpart: such a token is an ordinary piece
    types = [kind if kind in spm.PieceType._value2member_map_ else int(spm.PieceType.NORMAL)
             for kind in vocab.token_types[:count]]

    def piece_of(i: int | None, default: str) -> tuple[int, str]:
        return (-1, default) if i is None or i >= count else (i, vocab.tokens[i])

    (bos_id, bos), (eos_id, eos), (pad_id, pad) = (piece_of(vocab.bos_id, "<s>"), piece_of(vocab.eos_id, "</s>"),
                                                   piece_of(vocab.pad_id, "<pad>"))
    model = spm.SentencePieceModel(
        pieces=vocab.tokens[:count], scores=[float(s) for s in scores[:count]], types=types,
        model_type=spm.ModelType.BPE, vocab_size=count, byte_fallback=True, unk_id=unknown[0],
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_piece=vocab.tokens[unknown[0]], bos_piece=bos,
        eos_piece=eos, pad_piece=pad, normalizer_name="identity",
        add_dummy_prefix=True if vocab.add_space_prefix is None else vocab.add_space_prefix,
        remove_extra_whitespaces=False, escape_whitespaces=True,
    )
    specials = {i: vocab.tokens[i] for i, kind in enumerate(vocab.token_types)
                if kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN) and not _is_padding(vocab, i)}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else None,
        "eos_token": vocab.tokens[vocab.eos_id] if vocab.eos_id is not None else None,
        "unk_token": vocab.tokens[unknown[0]],
        "pad_token": vocab.tokens[vocab.pad_id] if vocab.pad_id is not None else None,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": vocab.token_types[i] != TokenType.USER_DEFINED}
            for i, text in specials.items()
        },
    }
    if vocab.chat_template:
        tokenizer_config["chat_template"] = vocab.chat_template
    return {
        tf.SENTENCEPIECE_FILE: spm.serialize(model),
        "tokenizer_config.json": json.dumps(tokenizer_config, ensure_ascii=False, indent=2).encode(),
    }


def _is_padding(vocab: GGUFVocab, i: int) -> bool:
    return vocab.token_types[i] == TokenType.UNUSED and vocab.tokens[i] == PAD_TOKEN.format(i)
