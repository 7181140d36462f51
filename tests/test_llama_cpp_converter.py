"""Our GGUF files against llama.cpp's own converter's (convert_hf_to_gguf.py of llama-cpp-python 0.3.36; fetched
by tests/llama_cpp_converter.py), on the families it accepts: 1bitLLM (its `bitnet` class, SentencePiece
tokenizer.model) and the Llama-family `bitlinear` layout (Falcon3, with the real Llama-3 tokenizer: it knows
BPE pre-tokenizers only by a hash of their output). 2B4T it refuses (docs/formats.md §6).

Per outtype (tq2_0, tq1_0, f16): the same tensors, types and shapes, ours adding a `.scale` tensor only where
our weight cannot hold the multiplier itself; every value the converter stores is ours rounded once to f16
(its TQ blocks' d and its F16 values are f16(multiplier)), so where the multiplier is an f16 value the bytes
are the same; and the keys llama.cpp reads are the same, but those docs/formats.md explains.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from families import write_family
from gguf import GGMLQuantizationType as T
from gguf import quants
from llama_cpp_converter import SCRIPT, converter_dir
from safetensors.torch import load_file, save_file
from tokenizer_fixtures import real_llama3_files

from bitnet_convert import api
from bitnet_convert.formats.gguf.reader import open_gguf, raw_bytes

pytestmark = pytest.mark.slow
OUTTYPES = ("tq2_0", "tq1_0", "f16")
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Keys only one side writes, and why (docs/formats.md §6 says the same).
ONLY_THEIRS = {
    "bitnet.rope.scaling.type", "bitnet.rope.scaling.factor",  # its bitnet class adds linear x1: no scaling
}
ONLY_OURS = {
    "bitnet_convert.provenance", "bitnet_convert.hidden_act", "bitnet_convert.multiplier",  # ours, ignored there
    # said, where it leaves llama.cpp to its defaults for them (the same values)
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.eot_token_id",
}
USER_DEFINED, NORMAL = 4, 1  # token types: it writes SentencePiece's user-defined pieces as normal ones
# A model card, so that the general.* keys it gives are compared too.
README = """---
license: mit
base_model:
- tiiuae/Falcon3-1B-Instruct
tags: [bitnet, "1.58-bit"]
language:
  - en
---
# A test model
"""


@pytest.fixture(scope="module")
def converter():
    folder = converter_dir()
    if folder is None:
        pytest.skip("llama.cpp's converter is not fetched (run `python tests/llama_cpp_converter.py` once; "
                    "or set LLAMA_CPP_CONVERTER_DIR to a folder holding convert_hf_to_gguf.py)")
    pytest.importorskip("sentencepiece")
    return folder


def _one_bit_llm(folder):
    write_family(folder, "1bitllm")
    (folder / "README.md").write_text(README)
    return folder


def _falcon3(folder):
    """Falcon3's layout with Llama 3's tokenizer (vocab 128256: embeddings padded with random bf16 rows), and
    layer 0's inverse scales powers of two, so their multipliers are f16 values and the others are not."""
    files = real_llama3_files()
    write_family(folder, "falcon3")
    config = json.loads((folder / "config.json").read_text())
    vocab = 128256
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        table = tensors[name]
        extra = torch.randn(vocab - table.shape[0], table.shape[1], generator=generator).to(table.dtype) * 0.02
        tensors[name] = torch.cat([table, extra])
    for name, value in tensors.items():
        if name.startswith("model.layers.0.") and name.endswith(".weight_scale"):
            tensors[name] = torch.exp2(torch.round(torch.log2(value.float()))).to(value.dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.update(vocab_size=vocab, bos_token_id=128000, eos_token_id=128001)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for stale in ("tokenizer.json", "tokenizer_config.json"):
        (folder / stale).unlink(missing_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text(README)
    return folder


FAMILIES = {"1bitllm": _one_bit_llm, "falcon3": _falcon3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, converter, tmp_path_factory):
    """family -> {outtype: (our file, its file)}"""
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param) / request.param)
    out = tmp_path_factory.mktemp(f"{request.param}-gguf")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # --no-lazy: its lazy mode fails on torch 2.13's meta tensors in the 2-bit unpacking. The three run at once,
    # while we write ours: the most of this test's time is their start-up.
    logs = {outtype: out / f"theirs-{outtype}.log" for outtype in OUTTYPES}  # files: a full pipe would stall it
    runs = {}
    for outtype in OUTTYPES:
        with open(logs[outtype], "w") as log:
            runs[outtype] = subprocess.Popen([sys.executable, str(converter / SCRIPT), str(folder), "--outfile",
                                              str(out / f"theirs-{outtype}.gguf"), "--outtype", outtype, "--no-lazy"],
                                             env=env, stdout=subprocess.DEVNULL, stderr=log)
    files = {}
    try:
        for outtype in OUTTYPES:
            ours = api.convert(folder, out / f"ours-{outtype}.gguf", target="llama.cpp", outtype=outtype)
            files[outtype] = (ours, out / f"theirs-{outtype}.gguf")
    finally:
        for run in runs.values():
            run.wait()
    for outtype, run in runs.items():
        assert run.returncode == 0, logs[outtype].read_text()[-3000:]
    return request.param, files


def _tensors(path) -> dict:
    header = open_gguf(path)
    return {t.name: (t.tensor_type, tuple(t.shape), raw_bytes(header, t)) for t in header.tensors}


def _values(ggml_type, shape, raw) -> np.ndarray:
    return quants.dequantize(np.asarray(raw, np.uint8), ggml_type).astype(np.float32).reshape(-1)


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_same_tensors_and_values(pair, outtype):
    family, files = pair
    ours, theirs = (_tensors(p) for p in files[outtype])
    scales = {n.removesuffix(".scale") + ".weight": ours.pop(n) for n in list(ours) if n.endswith(".scale")}
    assert ours.keys() == theirs.keys()
    for name, (ggml_type, shape, raw) in theirs.items():
        assert (ours[name][0], ours[name][1]) == (ggml_type, shape), name
        is_projection = name.split(".")[-2] in PROJECTIONS
        if not is_projection or name not in scales:
            # same bytes: norms and embeddings, and projections whose multiplier is an f16 value (in TQ the
            # blocks' d; never in F16, where our values are codes and the multiplier is in `.scale`)
            assert bytes(ours[name][2]) == bytes(raw), name
            continue
        scale = np.frombuffer(bytes(scales[name][2]), np.float32)[0]
        exact = _values(*ours[name]) * scale  # codes x multiplier: d x scale is the multiplier exactly
        # Its values are the multiplier rounded to f16 (its TQ d, its F16 values): ours rounded once
        np.testing.assert_array_equal(_values(ggml_type, shape, raw), exact.astype(np.float16).astype(np.float32),
                                      err_msg=name)
    if outtype == "f16":
        assert scales.keys() == {n for n in theirs if n.split(".")[-2] in PROJECTIONS}
    elif family == "falcon3":  # layer 0's multipliers are f16 values (1/power of two), the others' are not
        assert scales and not any(n.startswith("blk.0.") for n in scales)


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_same_keys(pair, outtype):
    """Every key both write holds the same value (general.* from the model card and the folder's name among
    them), but SentencePiece's user-defined pieces; the rest is ONLY_THEIRS / ONLY_OURS."""
    _, files = pair
    ours, theirs = (open_gguf(p) for p in files[outtype])
    assert theirs.fields.keys() - ours.fields.keys() <= ONLY_THEIRS
    assert ours.fields.keys() - theirs.fields.keys() <= ONLY_OURS
    assert ours.value("general.license") == "mit" and ours.value("general.base_model.0.name") == "Falcon3 1B Instruct"
    for key in ours.fields.keys() & theirs.fields.keys():
        if key.startswith("GGUF."):
            continue
        mine, its = ours.value(key), theirs.value(key)
        if key == "tokenizer.ggml.token_type":
            mine = [NORMAL if kind == USER_DEFINED else kind for kind in mine]
        assert mine == its, key
