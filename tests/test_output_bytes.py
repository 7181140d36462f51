"""Every output of every writer, byte for byte: sha256 digests of the built-in tiny model's conversions.

The digests were first recorded from the writers as they stood before the output pipeline (fileio/output.py)
took over publishing, hashing, read-ahead and provenance from each format, and held unchanged through that
change and the GGUF package's; then recorded again on purpose when outputs were meant to change: the
`sha256-model-v3` content hash (every output's provenance record), TQ blocks holding the multiplier and the
`general.*` keys as llama.cpp's converter writes them (GGUF). A change to how outputs are written must leave
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
    "hf": "a2424c65c2d5c0401bf939516af0cd7ec77314654445d0c95aa8fbf701034c25",
    "hf-bitlinear-f32": "d718540c2d9fc39f376ee2f2f785c921d14a7457f713ae55861c576b4a3f166f",
    "hf-sharded": "49b0a1bd43e691ff82251d01052d9bd604bf930a761361cad202a8be0c03b306",
    "hf-online-masters": "d71b105f0d5c42728d309cc1c0e97db028fdffbc637f37284c90056eb6a5cb6e",
    "flax": "6500ea55924fef5d962eb556f905adcd295021e46895487eb7f70c9a1923ef5c",
    "flax-masters": "b575c9ac4d6c7c39d1acb13ae397b86faaff56139d9aac332f5a1df0cb28182c",
    "npz": "946b91583f16d398387c51f309edb9ff82a0fb95e09c456a8e2379066c278662",
    "npz-masters": "75e7d2ec219288de59d4cdfced46779f5cb257c73db59681e68d456c656eaa3d",
    "gguf-masters": "46081f9e81148276d8cdc1dd9eeba347cebf57d52e509894e6806617048fe0a4",
    "gguf-llama-family": "8981c2fa0ebbebae5dfc46434a4c4f2635a7715264c994bfa0c271bfc816c614",
    "gguf-llama-family-bitnet.cpp": "117c755fe1b81ded4dcb9e3e66de04b86b9929a981fd16fd770a1840c03316b2",
    "hf-file-to-gguf": "60a84c56d4983be2d5d166c71e2105098097be9274bd5859e4cf7b95de2da044",
    "hf-file-to-gguf-i2_s": "9864a031b6bb7d17680227bc97effa37937f4f4b9da9421f292f23e9b73f62f5",
    "hf-file-to-npz": "be94729c2afdb9ebe0ddbba005a7dc3032e17f733fca65e799f0b4a9e874e416",
    "hf-file-to-flax": "ebd5a254bc348a0ad32077219a42fd66f7c01912700b3f99f49cf6b196dcdf7e",
    "hf-file-to-hf-bitlinear": "e5d622567d1e884f6f4a45d0a5680ec1f456744fa9dea290d902cacd4c7448ba",
    "embedding-qwen3-gguf": "2b7f759b68fe4728a49a2c410fb1900abf6aa363de106a5aa95c5f26533321c0",
    "embedding-gemma3-gguf": "761216efe63c6985191de5f3f532162be434c3acf9b011bf4ad7f72ffa930014",
    "embedding-qwen3-hf": "6a8f2ad3622a977ef41a0f180626cdaaa43ea80516af83c742f9324dfbd1e3cf",
    "gguf-llama.cpp-tq1_0": "440e92fe3c531ac9ed8763970f25afd1d92236824ba14936cafa149cfeefcec9",
    "gguf-llama.cpp-tq2_0": "b398b525bfacbf289172b94d404d9f1964db5c7dea4c5bb433c1e1e30ef7cc98",
    "gguf-llama.cpp-f16": "0ea379a3b9d708116094da476a53e0ae802a65a04b8bce687156989acdbb6567",
    "gguf-llama.cpp-bf16": "d4d4f99b010e4140ad0b7ac5b3f9d834a831f55cc3478628185b7ea36f1d5721",
    "gguf-llama.cpp-f32": "7da09f6cbe06f4afa783d7f7a4e7dae794fa4037f156c82f1a602992dbf173d2",
    "gguf-bitnet.cpp-i2_s": "367e9864fc7cc2b71906ad2801e35b4c9575955fbc4917f8fd48d1cd350815f6",
    "gguf-bitnet.cpp-f16": "ebe69b9bd9695c456db9925fef9b8a2c705a2364de6ca71a88385b8f67f9476d",
    "gguf-bitnet.cpp-bf16": "54e9f540642d0a096b72e2d91fb281507076c879dffcbbff45a0ece4276382c2",
    "gguf-bitnet.cpp-f32": "8cb5684d4f9556f66cdd1b35a974b1a983e383bc28cfc929001aef92e7675e63",
    "gguf-embed-f16": "b398b525bfacbf289172b94d404d9f1964db5c7dea4c5bb433c1e1e30ef7cc98",
    "gguf-embed-bf16": "c3debb9b42643715f85235dc6f72e48c89c30a194d31b936b9372aa59cbed36c",
    "gguf-embed-f32": "5f374eb194082c774428d834e4338f5675219d85dcb6693b894140615b8b40ab",
    "gguf-embed-q8_0": "7e3b9763a92dff5f69f583465e916efc1abb880831c2ee60510d3d8c25cca1e9",
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
