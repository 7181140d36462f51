"""How an embedding model pools its encoder output: sentence-transformers' pooling config, else the default.

bitnet.cpp's embedding converter reads `modules.json` and the pooling config of its first `*Pooling` module
(mean > cls > last token, in that precedence) and defaults to MEAN. The model card says last token; the GGUFs
Microsoft ships carry MEAN, which is reported to be the only mode that reproduces the card's vectors
(docs/formats.md §12). So: the config when present, else MEAN, and every caller reports which it used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from bitnet_core.config import QWEN3
from bitnet_core.errors import ConvertError
from bitnet_core.names import POOLING_CONFIG_FILE

POOLINGS = ("mean", "last", "cls")
QWEN3_EOS = "<|endoftext|>"  # what Qwen3 texts end on (bitnet.cpp's embedding GGUF: its eos, add_eos_token)
DEFAULT_POOLING = "mean"
# sentence-transformers' Pooling config keys -> our modes, in bitnet.cpp's precedence
_MODES = (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"))
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def pooling_of(files: Mapping[str, bytes], where: str) -> tuple[str, str]:
    """(mode, where it came from) from a checkpoint's side files; ConvertError naming `where` on a config that
    is not JSON or asks for a mode we do not compute."""
    modules = files.get("modules.json")
    if modules is None:
        return DEFAULT_POOLING, "default (no sentence-transformers modules.json)"
    listed = _json(modules, f"{where}: modules.json")
    if not isinstance(listed, list):
        raise ConvertError(f"{where}: modules.json is not a list of modules")
    pooling = next((m for m in listed if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        return DEFAULT_POOLING, "default (modules.json lists no Pooling module)"
    name = f"{pooling.get('path', '')}/config.json"
    if name != POOLING_CONFIG_FILE:
        raise ConvertError(f"{where}: modules.json puts its Pooling config at {name!r:.60}; only "
                           f"{POOLING_CONFIG_FILE} is read")
    if POOLING_CONFIG_FILE not in files:
        return DEFAULT_POOLING, f"default ({POOLING_CONFIG_FILE} is missing)"
    config = _json(files[POOLING_CONFIG_FILE], f"{where}: {POOLING_CONFIG_FILE}")
    if not isinstance(config, dict):
        raise ConvertError(f"{where}: {POOLING_CONFIG_FILE} is not a JSON object")
    for key, mode in _MODES:
        if config.get(key) is True:
            return mode, POOLING_CONFIG_FILE
    odd = next((key for key in _UNSUPPORTED if config.get(key) is True), None)
    if odd:
        raise ConvertError(f"{where}: {POOLING_CONFIG_FILE} asks for {odd}, which is not supported "
                           f"(mean, cls or last token)")
    return DEFAULT_POOLING, f"default ({POOLING_CONFIG_FILE} sets no pooling mode)"


def end_token(architecture: str, pooling: str, token_id: Callable[[str], int | None], eos_token_id,
              where: str) -> int | None:
    """The id appended to every text before encoding, or None: Qwen3's `<|endoftext|>` always (bitnet.cpp's
    embedding converter makes it the GGUF's EOS with add_eos_token), else the config's EOS when pooling by last
    token. `token_id(text)`: the tokenizer's id of a token, None if it has none."""
    if architecture == QWEN3 and token_id(QWEN3_EOS) is not None:
        return token_id(QWEN3_EOS)
    if pooling != "last":
        return None
    eos = (eos_token_id[0] if eos_token_id else None) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    if eos is None:
        raise ConvertError(f"{where}: last-token pooling needs an end token, and the config names none")
    return int(eos)


def _json(data: bytes, label: str):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{label}: not JSON ({exc})") from None
    except RecursionError:
        raise ConvertError(f"{label}: JSON nested too deeply") from None
