"""Every output of every writer, byte for byte: sha256 digests of the built-in tiny model's conversions.

The digests were recorded from the writers as they stood before the output pipeline (fileio/output.py) took
over publishing, hashing, read-ahead and provenance from each format; a change to how outputs are written
must leave every one of them as it is. A change that means to change bytes (a new key, a codec default)
records them again: `BITNET_RECORD_DIGESTS=1 pytest tests/test_output_bytes.py -s` prints the table.

Nothing here varies between runs or machines: the tiny model is built from a seed, its provenance names no
path, and the conversions that start from files (the transcoding paths from HF's packed bytes) name a fixed
source in place of the temporary path the reader recorded (the only thing that legitimately differs: the
writer copies it into the provenance record).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import pytest
from embedding_fixtures import write_embedding_checkpoint

from bitnet_convert.formats import registry
from bitnet_convert.tiny import tiny_checkpoint

RECORD = os.environ.get("BITNET_RECORD_DIGESTS") == "1"
FIXED_SOURCE = "tests/fixed-source"

# name -> (source, output name, format, writer options)
CASES: dict[str, tuple[str, str, str, dict]] = {
    "hf": ("tiny", "m-hf", "hf", {}),
    "hf-bitlinear-f32": ("tiny", "m-hf", "hf", {"layout": "bitlinear", "scale_dtype": "f32"}),
    "hf-sharded": ("tiny", "m-hf", "hf", {"max_shard_bytes": 300_000}),
    "hf-online-masters": ("masters", "m-hf", "hf", {"layout": "online"}),
    "flax": ("tiny", "m-flax", "flax", {}),
    "flax-masters": ("masters", "m-flax", "flax", {}),
    "npz": ("tiny", "m.npz", "npz", {}),
    "npz-masters": ("masters", "m.npz", "npz", {}),
    "gguf-masters": ("masters", "m.gguf", "gguf", {}),
    "gguf-llama-family": ("llama", "m.gguf", "gguf", {}),
    "gguf-llama-family-bitnet.cpp": ("llama", "m.gguf", "gguf", {"target": "bitnet.cpp"}),
    "hf-file-to-gguf": ("hf-file", "m.gguf", "gguf", {}),
    "hf-file-to-gguf-i2_s": ("hf-file", "m.gguf", "gguf", {"target": "bitnet.cpp"}),
    "hf-file-to-npz": ("hf-file", "m.npz", "npz", {}),
    "hf-file-to-flax": ("hf-file", "m-flax", "flax", {}),
    "hf-file-to-hf-bitlinear": ("hf-file", "m-hf", "hf", {"layout": "bitlinear"}),
    "embedding-qwen3-gguf": ("embedding-qwen3", "m.gguf", "gguf", {}),
    "embedding-gemma3-gguf": ("embedding-gemma3", "m.gguf", "gguf", {"embed_type": "bf16"}),
    "embedding-qwen3-hf": ("embedding-qwen3", "m-hf", "hf", {}),
}
for _outtype in ("tq1_0", "tq2_0", "f16", "bf16", "f32"):
    CASES[f"gguf-llama.cpp-{_outtype}"] = ("tiny", "m.gguf", "gguf", {"target": "llama.cpp", "outtype": _outtype})
for _outtype in ("i2_s", "f16", "bf16", "f32"):
    CASES[f"gguf-bitnet.cpp-{_outtype}"] = ("tiny", "m.gguf", "gguf", {"target": "bitnet.cpp", "outtype": _outtype})
for _embed in ("f16", "bf16", "f32", "q8_0"):
    CASES[f"gguf-embed-{_embed}"] = ("tiny", "m.gguf", "gguf", {"embed_type": _embed})

EXPECTED: dict[str, str] = {
    "hf": "51a13310d67a8fe3cb85678fff56a77c255b5871075ae214d6c50bbc28f99c6b",
    "hf-bitlinear-f32": "af63082bfd44568b14f37b3d10519292520e1617d159c7b8bd5b8d0383c29810",
    "hf-sharded": "1375e5a1ed0208a5fea6934bbff23e740d1ca2f20127875aeed0be687af109f0",
    "hf-online-masters": "2a900fbdc152fb8eaad609a885f7b65652f8f89fab31f12851a8917cbb69057c",
    "flax": "01bbf8ea1ea2e58dd691b54a4f36e0f2246fa0f71535fce430032b1a626a045a",
    "flax-masters": "c3ce25dfe2e88e9f2e551a6bc13c6e31f0165db02d7a842cf66b11fcace91d84",
    "npz": "d17768c95682ca575d6aad5815f1aa72a5adcc03d44dd317a995a2fc46a67d61",
    "npz-masters": "b989566f74429d978ee426dff4d11535c475371b294ba023a87269ab0f735c4d",
    "gguf-masters": "9c4e6c40e4562fa90b2a8a2836567a0b9bd6a927e50815544c2e4f2aa1a2eaad",
    "gguf-llama-family": "d2e4d03e8bd5989e562e788cb086da342121e149567ffbf906b99b7a5550898e",
    "gguf-llama-family-bitnet.cpp": "f7bc8f92ba56cae6bedc9ac8a76f81d69e29fd39a149b4f9a84bfd4788e76d6a",
    "hf-file-to-gguf": "1450df8db7b4a1d958a233adc145fcd8f42c54e9063405c417e18c02e2f3b013",
    "hf-file-to-gguf-i2_s": "f6ef74597d12a5f3f1a1566d9c4a3b093ea0ca72785efd0cd6fe9b7e25699ce4",
    "hf-file-to-npz": "8a1c965e3ec15eecee0155fdbe991c9ee78d57999c987654cf509c7898a431bc",
    "hf-file-to-flax": "0c52d09d22896fe6fe2cbfbbc4f0054bf6e64762af66bbc71818323a1aa2e535",
    "hf-file-to-hf-bitlinear": "05623c797dbb5b21fbb6f1c1563460f48777fef59b91915a6ca26e196cb07e8a",
    "embedding-qwen3-gguf": "8aa7df447a4283958eb4ce721c970cc2d7640e94af6510d83ef508cf5b39de7f",
    "embedding-gemma3-gguf": "f1544d6a0df190508682d32424650222025f47223141ef2563074d8305cc3b07",
    "embedding-qwen3-hf": "9e65391af8328a9e98759450183156b7b65aaac9a051724d22f5f637d19316d7",
    "gguf-llama.cpp-tq1_0": "acb8a210f6578a1a7a3091f76aab48568f7ef525291316374a908276ee577a5f",
    "gguf-llama.cpp-tq2_0": "7a060722080de5759baa32173e2caaf950d239b5c0ae3d234958709862ac46e5",
    "gguf-llama.cpp-f16": "665ebaf60c34fadf1b062c89c26ebd1b31781d57b08750ccb95b3dc94c09f4be",
    "gguf-llama.cpp-bf16": "51ace3a61c665c3bbf389d6c1f4bedf17b0a765e75e4fa1f8679b6f05bce35de",
    "gguf-llama.cpp-f32": "83bfa43a1ded22a9c30421434dcff54e22d5361546788eaf3fc5f535ae611468",
    "gguf-bitnet.cpp-i2_s": "7bc4bb425f1f622dc431e06c390d50b69b0dadeffe9369d3934e7d5cffcb0647",
    "gguf-bitnet.cpp-f16": "483debd499fd92f7224dc88c44749c8956c2cbf17f56222f148c11759efb34af",
    "gguf-bitnet.cpp-bf16": "54f8f00ce2f3bab98c4899082ad39f2468ca5b6b6d48141c029d0e98154ab9ae",
    "gguf-bitnet.cpp-f32": "7554dadd34edd2e6518b42e8e24c1b0fbb088af06b53fdfbbda831d4a60a4fb0",
    "gguf-embed-f16": "7a060722080de5759baa32173e2caaf950d239b5c0ae3d234958709862ac46e5",
    "gguf-embed-bf16": "b4fac6a761cd620ee3310afc06e0ba7d0b1d47e6408081ecafc90dbbea7a5701",
    "gguf-embed-f32": "39df1ae60be9db8b81bb6c67783fc39d8387d82cf5302559717207b6ff7cf91c",
    "gguf-embed-q8_0": "71bfe6f87150a480d0bb772793d69d1c275d58f6216e13f78dd1534416643411",
}


@functools.cache
def _tiny(kind: str):
    if kind == "masters":
        return tiny_checkpoint(seed=0, masters=True)
    if kind == "llama":
        return tiny_checkpoint(seed=1, architecture="LlamaForCausalLM", hidden_act="silu")
    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    """The tiny model as an HF folder (packed bytes: what the writers transcode from without unpacking)."""
    folder = tmp_path_factory.mktemp("source") / "tiny-hf"
    registry.write_checkpoint(_tiny("tiny"), str(folder), "hf")
    return folder


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """The tiny BitNet-embedding models (bitnet.cpp's embedding GGUF: its own writer's keys and plan)."""
    root = tmp_path_factory.mktemp("embedding")
    return {backbone: write_embedding_checkpoint(root / backbone, backbone, "i2s", pooling="mean", tokenizer="gguf")
            for backbone in ("qwen3", "gemma3")}


def _source(kind: str, hf_file: Path, embedding_files: dict):
    if kind.startswith("embedding-"):
        path = embedding_files[kind.removeprefix("embedding-")]
    elif kind == "hf-file":
        path = hf_file
    else:
        return _tiny(kind)
    ckpt = registry.read_checkpoint(str(path))
    fixed = dict(ckpt.provenance, path=FIXED_SOURCE, source=FIXED_SOURCE)  # the reader's temporary path
    return dataclasses.replace(ckpt, provenance=fixed)


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative name, file digest) list, every file included."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    listing = sorted((str(p.relative_to(path)), hashlib.sha256(p.read_bytes()).hexdigest())
                     for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(repr(listing).encode()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_output_bytes_unchanged(case, hf_file, embedding_files, tmp_path):
    source, name, fmt, options = CASES[case]
    out = tmp_path / name
    registry.format_module(fmt).write(_source(source, hf_file, embedding_files), str(out), **options)
    found = digest(out)
    if RECORD:
        print(f'    "{case}": "{found}",')
        return
    assert found == EXPECTED[case], f"{case}: the output's bytes changed"
