"""SentencePiece `tokenizer.model` files, read and written without the sentencepiece or protobuf packages.

The file is one protobuf message, `sentencepiece.ModelProto` (sentencepiece_model.proto, proto2). Only the
fields that decide how text is split are read; everything else is skipped by its wire type, so newer files with
more fields still read. Nothing is ever unpickled or executed: a file that is not a well-formed message is one
ConvertError naming the first thing wrong.

    ModelProto      1 pieces (repeated SentencePiece)   2 trainer_spec   3 normalizer_spec
    SentencePiece   1 piece (string)   2 score (float)   3 type (enum, default NORMAL)
    TrainerSpec     3 model_type   4 vocab_size   35 byte_fallback   24 treat_whitespace_as_suffix
                    40..43 unk/bos/eos/pad id   45..48 unk/bos/eos/pad piece
    NormalizerSpec  1 name   2 precompiled_charsmap   3 add_dummy_prefix   4 remove_extra_whitespaces
                    5 escape_whitespaces
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from bitnet_core.errors import ConvertError


class PieceType(enum.IntEnum):
    """SentencePiece.Type; the same numbers as GGUF's token types (llama.cpp took them from here)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(enum.IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


# protobuf wire types
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# field numbers (sentencepiece_model.proto)
MODEL_PIECES, MODEL_TRAINER, MODEL_NORMALIZER = 1, 2, 3
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
# TrainerSpec: field -> (attribute, kind); kinds: int (int32 varint, may be negative), bool, str
TRAINER_FIELDS = {
    3: ("model_type", "int"), 4: ("vocab_size", "int"), 24: ("treat_whitespace_as_suffix", "bool"),
    35: ("byte_fallback", "bool"), 40: ("unk_id", "int"), 41: ("bos_id", "int"), 42: ("eos_id", "int"),
    43: ("pad_id", "int"), 45: ("unk_piece", "str"), 46: ("bos_piece", "str"), 47: ("eos_piece", "str"),
    48: ("pad_piece", "str"),
}
NORMALIZER_FIELDS = {
    1: ("normalizer_name", "str"), 2: ("precompiled_charsmap", "bytes"), 3: ("add_dummy_prefix", "bool"),
    4: ("remove_extra_whitespaces", "bool"), 5: ("escape_whitespaces", "bool"),
}


@dataclasses.dataclass
class SentencePieceModel:
    """What a tokenizer.model says about splitting text; defaults are the proto's own defaults."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = ModelType.UNIGRAM
    vocab_size: int = 8000
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# ------------------------------------------------------------------------------------------------- reading


class _Malformed(Exception):
    """Raised inside the decoder; turned into one ConvertError by parse()."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise _Malformed(f"a number runs past the end at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"a number longer than 10 bytes at byte {pos}")


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value, offset) of each field in data[start:end]; a LENGTH value is a (start,
    end) pair into `data`, a FIXED32 value its 4 bytes, a VARINT the unsigned number."""
    pos = start
    while pos < end:
        at = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {at}")
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire == FIXED64:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == FIXED32:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == LENGTH:
            size, pos = _varint(data, pos)
            value, pos = (pos, pos + size), pos + size
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by this schema) at byte {at}")
        if pos > end:
            raise _Malformed(f"field {number} at byte {at} runs past the end of its message")
        yield number, wire, value, at


def _expect(wire: int, wanted: int, number: int, message: str, at: int) -> None:
    if wire != wanted:
        raise _Malformed(f"{message} field {number} has wire type {wire}, expected {wanted} (byte {at})")


def _int32(value: int) -> int:
    """A proto int32 as encoded in a varint (negative numbers take 10 bytes, two's complement of 64 bits)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(data: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return data[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} at byte {span[0]} is not UTF-8") from None


def _piece(data: bytes, span: tuple[int, int]) -> tuple[str, float, int]:
    text, score, kind = None, 0.0, int(PieceType.NORMAL)
    for number, wire, value, at in _fields(data, *span):
        if number == PIECE_TEXT:
            _expect(wire, LENGTH, number, "SentencePiece", at)
            text = _text(data, value, "a piece")
        elif number == PIECE_SCORE:
            _expect(wire, FIXED32, number, "SentencePiece", at)
            score = struct.unpack("<f", value)[0]
        elif number == PIECE_TYPE:
            _expect(wire, VARINT, number, "SentencePiece", at)
            if value not in PieceType._value2member_map_:
                raise _Malformed(f"piece type {value} at byte {at} is not one of 1..6")
            kind = value
    if text is None:
        raise _Malformed(f"the piece at byte {span[0]} has no text")
    return text, score, kind


def _spec(data: bytes, span: tuple[int, int], table: dict, message: str) -> dict:
    """The fields of `table` found in a TrainerSpec / NormalizerSpec, by attribute name."""
    found = {}
    for number, wire, value, at in _fields(data, *span):
        if number not in table:
            continue
        name, kind = table[number]
        if kind in ("str", "bytes"):
            _expect(wire, LENGTH, number, message, at)
            found[name] = _text(data, value, name) if kind == "str" else data[value[0]:value[1]]
        else:
            _expect(wire, VARINT, number, message, at)
            found[name] = bool(value) if kind == "bool" else _int32(value)
    return found


def parse(data: bytes, where: str) -> SentencePieceModel:
    """The model in a tokenizer.model file; `where` names the file in the one-line error."""
    try:
        pieces, settings = [], {}
        for number, wire, value, at in _fields(data, 0, len(data)):
            if number == MODEL_PIECES:
                _expect(wire, LENGTH, number, "ModelProto", at)
                pieces.append(_piece(data, value))
            elif number == MODEL_TRAINER:
                _expect(wire, LENGTH, number, "ModelProto", at)
                settings.update(_spec(data, value, TRAINER_FIELDS, "TrainerSpec"))
            elif number == MODEL_NORMALIZER:
                _expect(wire, LENGTH, number, "ModelProto", at)
                settings.update(_spec(data, value, NORMALIZER_FIELDS, "NormalizerSpec"))
    except _Malformed as exc:
        raise ConvertError(f"{where}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise ConvertError(f"{where}: not a SentencePiece model (it holds no pieces)")
    texts, scores, types = (list(column) for column in zip(*pieces))
    return SentencePieceModel(texts, scores, types, **settings)


# ------------------------------------------------------------------------------------------------- writing


def _put_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as 64-bit two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _put(number: int, wire: int, payload: bytes) -> bytes:
    head = _put_varint(number << 3 | wire)
    if wire == LENGTH:
        return head + _put_varint(len(payload)) + payload
    return head + payload


def _put_spec(model: SentencePieceModel, table: dict) -> bytes:
    parts = []
    for number, (name, kind) in sorted(table.items()):
        value = getattr(model, name)
        if kind == "str":
            parts.append(_put(number, LENGTH, value.encode("utf-8")))
        elif kind == "bytes":
            if value:
                parts.append(_put(number, LENGTH, value))
        else:
            parts.append(_put(number, VARINT, _put_varint(int(value))))
    return b"".join(parts)


def serialize(model: SentencePieceModel) -> bytes:
    """The tokenizer.model bytes of `model`: pieces, then the trainer and normalizer settings it holds."""
    pieces = []
    for text, score, kind in zip(model.pieces, model.scores, model.types, strict=True):
        body = _put(PIECE_TEXT, LENGTH, text.encode("utf-8")) + _put(PIECE_SCORE, FIXED32, struct.pack("<f", score))
        if kind != PieceType.NORMAL:  # the proto default
            body += _put(PIECE_TYPE, VARINT, _put_varint(kind))
        pieces.append(_put(MODEL_PIECES, LENGTH, body))
    trainer = _put(MODEL_TRAINER, LENGTH, _put_spec(model, TRAINER_FIELDS))
    normalizer = _put(MODEL_NORMALIZER, LENGTH, _put_spec(model, NORMALIZER_FIELDS))
    return b"".join(pieces) + trainer + normalizer
