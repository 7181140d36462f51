"""A model card's front matter (formats/model_card.py) and the general.* keys a GGUF takes from it and from the
source's name, as llama.cpp's converter writes them (tests/test_llama_cpp_converter.py holds them against its
files)."""

import shutil

import pytest

from bitnet_convert import api
from bitnet_convert.formats import model_card
from bitnet_convert.formats.gguf.reader import open_gguf

CARD = """---
license: mit   # the card's own comment
base_model:
  - microsoft/bitnet-b1.58-2B-4T
  - 'https://huggingface.co/tiiuae/Falcon3-1B-Instruct'
tags: [bitnet, "1.58-bit"]
language:
- en
pipeline_tag: text-generation
model-index:
  - name: x
    results: []
widget:
  text: "a mapping: skipped"
inference: |
  a block scalar
---
# A model

license: not-this-one
"""


def test_front_matter_forms():
    assert model_card.parse(CARD) == {
        "license": "mit",
        "base_model": ["microsoft/bitnet-b1.58-2B-4T", "https://huggingface.co/tiiuae/Falcon3-1B-Instruct"],
        "tags": ["bitnet", "1.58-bit"], "language": ["en"], "pipeline_tag": "text-generation",
    }


@pytest.mark.parametrize("text", [
    "", "# no front matter\nlicense: mit\n", "---\nlicense: mit\n",  # none, or never closed
    "---\n- a list\n- at the top\n---\n", "---\n: no key\n---\n",
])
def test_no_front_matter(text):
    assert model_card.parse(text) == {}


def test_bounded_and_never_fatal(tmp_path):
    """Only the first MAX_BYTES are read: a front matter closing beyond them is none; bytes that are not UTF-8
    are replaced; a README.md that is not a regular file is no card."""
    (tmp_path / "README.md").write_text("---\nlicense: mit\n" + "#\n" * model_card.MAX_BYTES + "---\n")
    assert model_card.read(tmp_path) == {}
    (tmp_path / "README.md").write_bytes(b"---\nlicense: \xff\xfemit\n---\n")
    assert model_card.read(tmp_path) == {"license": "\ufffd\ufffdmit"}
    (tmp_path / "README.md").unlink()
    (tmp_path / "README.md").mkdir()
    assert model_card.read(tmp_path) == {}


def test_general_keys_from_card_and_name(hf_checkpoint, tmp_path):
    """general.* as llama.cpp's converter writes them: the folder's name in title case and what its parts say
    (a "2B" in it that the tiny model's 1.3 M parameters belie is taken for a finetune, and the size label
    comes from the count), license, base models and tags from the card; all in the content hash."""
    folder = tmp_path / "BitNet-b1.58-2B-Instruct"
    shutil.copytree(hf_checkpoint(), folder)
    (folder / "README.md").write_text(CARD)
    out = api.convert(folder, tmp_path / "m.gguf")
    header = open_gguf(out)
    assert {key: header.value(key) for key in header.fields if key.startswith("general.")} == {
        "general.architecture": "bitnet",
        "general.type": "model",
        "general.name": "BitNet B1.58 2B Instruct",
        "general.basename": "BitNet-b1.58",
        "general.finetune": "2b-Instruct",
        "general.size_label": "1.3M",
        "general.license": "mit",
        "general.base_model.count": 2,
        "general.base_model.0.name": "Bitnet B1.58 2B 4T",
        "general.base_model.0.organization": "Microsoft",
        "general.base_model.0.repo_url": "https://huggingface.co/microsoft/bitnet-b1.58-2B-4T",
        "general.base_model.1.name": "Falcon3 1B Instruct",
        "general.base_model.1.organization": "Tiiuae",
        "general.base_model.1.repo_url": "https://huggingface.co/tiiuae/Falcon3-1B-Instruct",
        "general.tags": ["bitnet", "1.58-bit", "text-generation"],
        "general.languages": ["en"],
        "general.file_type": 37,
        "general.quantization_version": 2,
    }
    assert api.inspect(out, check=True).check_passed
    data = out.read_bytes()  # the license as stored, changed: the content hash no longer matches
    out.write_bytes(data.replace(b"\x03\x00\x00\x00\x00\x00\x00\x00mit", b"\x03\x00\x00\x00\x00\x00\x00\x00MIT", 1))
    assert out.read_bytes() != data and not api.inspect(out, check=True).check_passed
