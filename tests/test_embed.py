"""`bitnet-convert embed` and `bitnet_convert.embed`: normalized sentence embeddings of the BitNet-embedding
models, against transformers' backbone with BitNet linear layers (bitnet_convert.reference) on stable fixtures.

The reference side is computed here from the same token ids: transformers' last hidden state, pooled as
sentence-transformers pools (mean over real tokens / last token / first token), L2-normalized.
"""

import reference_extra

reference_extra.require()  # the fixtures are written with torch and transformers

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from embedding_fixtures import EOS, write_embedding_checkpoint
from tokenizers import Tokenizer

import bitnet_convert
from bitnet_convert.cli import main
from bitnet_convert.reference import load_embedding_reference
from bitnet_core.errors import ConvertError

TEXTS = ["hello world", "the cat sat on a mat", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 the cat"]


def reference_embeddings(folder, sequences, pooling):
    model = load_embedding_reference(folder)
    out = []
    for ids in sequences:  # one at a time: no padding on the reference side
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        v = {"mean": h.mean(0), "last": h[-1], "cls": h[0]}[pooling]
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def token_ids(folder, backbone, append_eos):
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id(EOS[backbone])
    return [tok.encode(t).ids + ([eos] if append_eos else []) for t in TEXTS]


@pytest.mark.parametrize("backbone, pooling, expected", [
    ("qwen3", "lasttoken", "last"),  # the model card's pooling, from 1_Pooling/config.json
    ("gemma3", None, "mean"),  # no sentence-transformers files: the default
    ("gemma3", "cls", "cls"),
])
@pytest.mark.slow
def test_cli_embeddings_match_transformers(tmp_path, backbone, pooling, expected):
    folder = write_embedding_checkpoint(tmp_path / "m", backbone, "small", pooling=pooling)
    args = ["embed", str(folder), "--json", "--batch-size", "2"] + [a for t in TEXTS for a in ("--text", t)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["pooling"] == expected
    assert out["pooling_source"] == ("1_Pooling/config.json" if pooling else
                                     "default (no sentence-transformers modules.json)")
    got = np.asarray(out["embeddings"], np.float32)
    assert got.shape == (len(TEXTS), 64) and out["dimension"] == 64
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # Qwen3 always ends on <|endoftext|> (bitnet.cpp's add_eos_token); Gemma3 only when pooled by last token
    sequences = token_ids(folder, backbone, append_eos=backbone == "qwen3" or expected == "last")
    assert out["token_counts"] == [len(s) for s in sequences]
    ref = reference_embeddings(folder, sequences, expected)
    cosine = (got * ref).sum(1)
    assert cosine.min() >= 0.9999, cosine
    # the plain output: the same numbers, one line per text, and the pooling on stderr
    plain = CliRunner().invoke(main, args[:2] + args[3:])
    assert plain.exit_code == 0
    rows = [line for line in plain.stdout.splitlines() if line]
    np.testing.assert_allclose(np.array([[float(v) for v in r.split()] for r in rows]), got, rtol=1e-7, atol=1e-9)
    assert f"pooling: {expected}" in plain.stderr


@pytest.mark.slow
def test_api_embed_texts_ids_and_override(tmp_path):
    folder = write_embedding_checkpoint(tmp_path / "m", "qwen3", "small", pooling="mean")
    by_text = bitnet_convert.embed(folder, TEXTS)
    assert (by_text.pooling, by_text.pooling_source) == ("mean", "1_Pooling/config.json")
    sequences = token_ids(folder, "qwen3", append_eos=True)
    by_ids = bitnet_convert.embed(folder, token_ids=sequences, batch_size=1)
    np.testing.assert_allclose(by_ids.embeddings, by_text.embeddings, atol=1e-6)  # other batch shapes
    last = bitnet_convert.embed(folder, TEXTS[0], pooling="last")
    assert (last.pooling, last.pooling_source) == ("last", "--pooling")
    np.testing.assert_allclose(last.embeddings, reference_embeddings(folder, sequences[:1], "last"), atol=1e-5)


def test_file_input(tmp_path):
    folder = write_embedding_checkpoint(tmp_path / "m", "qwen3", "small")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n\n")
    result = CliRunner().invoke(main, ["embed", str(folder), "--file", str(tmp_path / "texts.txt"), "--json"])
    assert result.exit_code == 0, result.output
    expected = bitnet_convert.embed(folder, TEXTS).embeddings
    np.testing.assert_allclose(np.asarray(json.loads(result.output)["embeddings"]), expected, atol=1e-7)


@pytest.mark.parametrize("case, message", [
    ("no-text", "give the texts with --text (one or more) or --file, not both"),
    ("both", "give the texts with --text (one or more) or --file, not both"),
    ("empty-file", "has no non-empty lines"),
    ("not-embedding", "is not an embedding model"),
    ("max-pooling", "asks for pooling_mode_max_tokens, which is not supported"),
    ("bad-modules", "modules.json: not JSON"),
    ("too-long", "more than the model's 512 (max_position_embeddings)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, hf_checkpoint, case, message):
    folder = write_embedding_checkpoint(tmp_path / "m", "qwen3", "small", pooling="mean")
    (tmp_path / "empty.txt").write_text("\n\n")
    args = {"no-text": [str(folder)], "both": [str(folder), "--text", "a", "--file", str(tmp_path / "empty.txt")],
            "empty-file": [str(folder), "--file", str(tmp_path / "empty.txt")],
            "not-embedding": [str(hf_checkpoint()), "--text", "a"],
            "max-pooling": [str(folder), "--text", "a"], "bad-modules": [str(folder), "--text", "a"],
            "too-long": [str(folder), "--text", " ".join(["the"] * 600)]}[case]
    if case == "max-pooling":
        config = json.loads((folder / "1_Pooling/config.json").read_text())
        config.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
        (folder / "1_Pooling/config.json").write_text(json.dumps(config))
    if case == "bad-modules":
        (folder / "modules.json").write_text("[{")
    result = CliRunner().invoke(main, ["embed", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_api_refuses_texts_and_ids_together(tmp_path):
    folder = write_embedding_checkpoint(tmp_path / "m", "qwen3", "small")
    with pytest.raises(ConvertError, match="one of the two"):
        bitnet_convert.embed(folder, ["a"], token_ids=[[1]])
