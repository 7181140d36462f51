"""Every output of every writer, byte for byte: sha256 digests of the built-in tiny model's conversions.

The digests were first recorded from the writers as they stood before the output pipeline (fileio/output.py)
took over publishing, hashing, read-ahead and provenance from each format, and held unchanged through that
change and the GGUF package's; then recorded again on purpose when outputs were meant to change: the
`sha256-model-v3` content hash (every output's provenance record), TQ blocks holding the multiplier and the
`general.*` keys as llama.cpp's converter writes them (GGUF), the `blake3-model-v4` content hash (held
unchanged through the native codecs first, with v3 recorded). A change to how outputs are written must leave
every one of them as it is. A change that means to change bytes (a new key, a codec default)
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
    "hf": "1300eeda7ce71ced646e8d9d4008e3e76e442876d2adf9a51320b6b24bd34736",
    "hf-bitlinear-f32": "c793c4ae6f75e147bc658580cd237cfa4b0c63399d46dc1fced7101c3f652fd3",
    "hf-sharded": "e464b96d1456b60ce1aa590bdfb6e58b55653dc2c9bc7aa0950333538a1598e9",
    "hf-online-masters": "59a3f0942466ec5575d7724f7477626aefe8d6de4e058abb4a536812338e2e77",
    "flax": "1ef7be3770ca9bfb472319716adb75f813a3a52cdbb77e7f96762042f07ee043",
    "flax-masters": "5d5e76a4c35797ac22e8956811b5a74a0a2e2dfcd0cf87c428938c264e5c931f",
    "npz": "8a92d23478961e52a61dddb806565ee35db673f44a563f18f4bbb19332df030b",
    "npz-masters": "1432f1ea18f1430d783bb6d8a3faa2972efbfa53d31738879020acabae3c71e9",
    "gguf-masters": "a6427907178cfb49bfd97a628e6fd0a75a7663c75b3ce2456ad67e9cd9111d00",
    "gguf-llama-family": "f1707a9e573e0352c9fba92f65e985e60f953921c33558e929c66ba879cb0d12",
    "gguf-llama-family-bitnet.cpp": "4ab6e9243538b1889227b206dd1437dd84ac6a0bddf83296093133c7d62db0d5",
    "hf-file-to-gguf": "fe80808dffdfa20448a4d76302d5fd91bedd392d29904c7d36c64103abc9c224",
    "hf-file-to-gguf-i2_s": "154b52826cab51ad28972c404db40eee1bda64f8322c7c5faaaa82cf4b66451e",
    "hf-file-to-npz": "1657c0e758543ac3dc718645f3dcee8a6b4ad433da3ee6a3d23f42e1e597b727",
    "hf-file-to-flax": "10486bbd8d17e132ad1095093864f59dcb2de8d1c48c98340add2897e447a6ee",
    "hf-file-to-hf-bitlinear": "70753ddbae20bf8d44b40fc04ef354f865b2f695c7db4fb8297680005f23cd94",
    "embedding-qwen3-gguf": "82a06be1f711e5b4837de795e721986266aa9efdb2db701b0c503b646b9f6618",
    "embedding-gemma3-gguf": "15b4f9fd3500c941bbe1ea7264a693590e30a6c255941d1d14b03da4bf237874",
    "embedding-qwen3-hf": "9fe359bb7421022719426476b7b0c51c9a82d882f5a67649ef0981695b386ad0",
    "gguf-llama.cpp-tq1_0": "e6a5c6d1330e42855f87971cc03d00a6eb44ddbac9574fa5800e96b0be9cb750",
    "gguf-llama.cpp-tq2_0": "b42f9f5bc4744c8cd25fb9f82f3d1a474329ae738539374d8825bd8a5828266b",
    "gguf-llama.cpp-f16": "12cb92c965d1124b64c83908e7204d69a17124de75e5938feae26fe69c1aa843",
    "gguf-llama.cpp-bf16": "f8ca69eeaf43a7cb9ec67be0b2d24ae6de14cdb00439f656da6b8d658fa2323f",
    "gguf-llama.cpp-f32": "4ed35cc42c8b1a2980fe6fe5d5791ab192274b527b5d0dd79819b9cd732b8909",
    "gguf-bitnet.cpp-i2_s": "08bffc9a7101a03ebd35045118a7723b67a50eabc8dea551d0d7e88039110756",
    "gguf-bitnet.cpp-f16": "171d59687e5c435cbd4b1517eb32c062fdc6b2ea7035fd1c8982a0f7c4636117",
    "gguf-bitnet.cpp-bf16": "748903d4472c69131bd42f4fd4c4702220f2e66dbe85d297fdc88e0350813943",
    "gguf-bitnet.cpp-f32": "ac1b320c7539b1d5276bcbb3d2c1ed049b9ab4c2b0a1895bd8b898bf78448f5e",
    "gguf-embed-f16": "b42f9f5bc4744c8cd25fb9f82f3d1a474329ae738539374d8825bd8a5828266b",
    "gguf-embed-bf16": "22c912f1714afbe002169174efeb47389d91d9e3af1c5d40692a36b8a28f47a1",
    "gguf-embed-f32": "a43ebe839783c8ae4574a719083034d59b4a6a377c42a357f95b5524e80e41c0",
    "gguf-embed-q8_0": "b23c9e0c6b19f710ef0468f542ea6e6dab8565643107af4c81bca57a9a23eb45",
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
