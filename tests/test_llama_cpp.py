"""llama.cpp runs our GGUF files: same logits as the JAX model, same token ids as transformers.

Needs llama-cpp-python (optional extra `llama`, builds llama.cpp from source); skipped without it.

What is compared, and why these tolerances:
* llama.cpp's bitnet graph computes SiLU, so the model under test is the tiny model with hidden_act=silu, its
  multipliers divided by sqrt(2/3 * in_features) so activations stay near unit size through the layers, as in
  a trained model (with tiny.py's multipliers of ~1.5 the random model is chaotic: int8 activation rounding
  alone moves its logits by 90% of their range, and no comparison of quantized runtimes means anything).
* llama.cpp does not quantize activations per token (BitNet's A8): with F32 weights it multiplies float
  activations by the codes and applies `.scale`. So the F32 file is checked against the JAX model with its
  activation quantizer switched off (weights codes*multiplier in float32): the same function in float32 in
  both, so they must agree to float32 rounding (TIGHT, relative to the largest logit).
* Against the real W1.58A8 JAX model, llama.cpp may differ only by what int8 activation rounding explains:
  at most A8_SLACK times the distance between the JAX model with and without its activation quantizer.
* TQ1_0/TQ2_0 run through ggml's Q8_K activations (int8 per 256-value block, a finer grid than one scale per
  token), so they may differ from the F32 file by no more than the same slack times that distance; and the two
  ternary types compute the same integer dot products, so they agree with each other to float rounding.
The KV cache is F32 and flash attention off: llama.cpp's default F16 cache alone moves logits by ~1e-2.
"""

import json

import numpy as np
import pytest

from bitnet_convert.formats import gguf
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp

TIGHT = 1e-4  # of max|logit|: float32 rounding of two implementations of one function
A8_SLACK = 1.5  # see the module docstring
GGML_TYPE_F32 = 0
TEXTS = [
    "User: How are you?<|eot_id|>Assistant: ",
    "The quick brown fox jumps over the lazy dog 1234567 times!!\n\n  It's   fine, isn't it?",
    "héllo wörld 🙂 tabs\tand\r\nnewlines",
]


@pytest.fixture(scope="module")
def silu():
    ckpt = tiny_checkpoint(seed=0, hidden_act="silu")
    arrays = {
        name: Ternary(v.codes, v.multiplier / np.sqrt(2 / 3 * v.codes.shape[1])) if isinstance(v, Ternary) else v
        for name, v in ckpt.materialize().items()
    }
    return Checkpoint.from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files,
                                  provenance=ckpt.provenance)


@pytest.fixture(scope="module")
def reference(silu):
    """JAX logits of the prompt: (ids, without activation quantization, with it = the W1.58A8 model)."""
    ids = prompt_ids(silu)
    return ids, jax_logits(silu, ids, quantize_activations=False), jax_logits(silu, ids, quantize_activations=True)


@pytest.fixture(scope="module")
def files(silu, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return {
        outtype: gguf.write(silu, folder / f"{outtype}.gguf", outtype=outtype, embed_type="f32")
        for outtype in ("f32", "tq2_0", "tq1_0")
    }


def load(path) -> "llama_cpp.Llama":
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, flash_attn=False,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_gpu_layers=0, verbose=False,
    )


def llama_logits(path, ids) -> np.ndarray:
    llm = load(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def prompt_ids(ckpt) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(ckpt.tokenizer_files["tokenizer.json"].decode()).encode(TEXTS[1]).ids[:24]


def jax_logits(ckpt, ids, *, quantize_activations: bool) -> np.ndarray:
    from bitnet_model import bitlinear, packed
    from bitnet_model.params import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    original = bitlinear.BitLinear.__call__

    def float_activations(self, x):  # codes * multiplier in float32, activations unquantized (llama.cpp)
        import jax

        w = packed.unpack(self.packed[...]).astype("float32") * self.multiplier[...]
        return jax.numpy.einsum("...i,oi->...o", x.astype("float32"), w, precision=jax.lax.Precision.HIGHEST)

    if not quantize_activations:
        bitlinear.BitLinear.__call__ = float_activations
    try:
        return np.asarray(model(np.asarray([ids], np.int32)))[0]  # eager: no jit cache shared with the patch
    finally:
        bitlinear.BitLinear.__call__ = original


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_f32_logits_match_the_float_activation_model(files, reference):
    ids, float_acts, _ = reference
    assert rel_err(llama_logits(files["f32"], ids), float_acts) < TIGHT


def test_f32_logits_near_the_w1_58a8_model(files, reference):
    ids, float_acts, w8a8 = reference
    a8_effect = rel_err(float_acts, w8a8)
    assert rel_err(llama_logits(files["f32"], ids), w8a8) <= A8_SLACK * a8_effect + TIGHT


def test_ternary_types_run(files, reference):
    ids, float_acts, w8a8 = reference
    f32 = llama_logits(files["f32"], ids)
    tq2, tq1 = llama_logits(files["tq2_0"], ids), llama_logits(files["tq1_0"], ids)
    assert rel_err(tq2, f32) <= A8_SLACK * rel_err(float_acts, w8a8)
    assert rel_err(tq1, tq2) < TIGHT


def test_both_tq_layouts_run(silu, files, tmp_path):
    """The multipliers above are not f16 values: their TQ blocks hold the nearest f16 (or the next) and a `.scale`
    the exact ratio. Rounded to f16 values, they sit in the blocks' d alone (llama.cpp's converter's layout, no
    `.scale`), and llama.cpp computes that model as its F32 file, within the same slack."""
    from gguf import GGUFReader

    assert any(t.name.endswith(".scale") for t in GGUFReader(files["tq2_0"]).tensors)
    rounded = Checkpoint.from_arrays(silu.config, {
        name: Ternary(v.codes, np.float32(np.float16(v.multiplier))) if isinstance(v, Ternary) else v
        for name, v in silu.materialize().items()}, tokenizer_files=silu.tokenizer_files)
    tq2 = gguf.write(rounded, tmp_path / "tq2.gguf", outtype="tq2_0", embed_type="f32")
    f32 = gguf.write(rounded, tmp_path / "f32.gguf", outtype="f32", embed_type="f32")
    assert not any(t.name.endswith(".scale") for t in GGUFReader(tq2).tensors)
    ids = prompt_ids(rounded)
    a8_effect = rel_err(jax_logits(rounded, ids, quantize_activations=False),
                        jax_logits(rounded, ids, quantize_activations=True))
    assert rel_err(llama_logits(tq2, ids), llama_logits(f32, ids)) <= A8_SLACK * a8_effect


def check_tokenization(llm, tokenizer_files, tmp_path):
    from transformers import AutoTokenizer

    for name, data in tokenizer_files.items():
        (tmp_path / name).write_bytes(data)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text


def test_tokenizes_like_transformers(silu, files, tmp_path):
    check_tokenization(load(files["tq2_0"]), silu.tokenizer_files, tmp_path)


def test_llama3_style_tokenizer(silu, tmp_path):
    """A Llama-3-layout tokenizer (regex Split, ignore_merges) goes in as `llama-bpe` and splits the same."""
    from test_gguf_tokenizer import llama3_style_files

    vocab_size = silu.config["vocab_size"]
    tok_files = llama3_style_files(vocab_size - 2)  # two special tokens on top
    specials = {t["content"]: t["id"] for t in json.loads(tok_files["tokenizer.json"])["added_tokens"]}
    config = dict(silu.config, bos_token_id=specials["<|begin_of_text|>"], eos_token_id=specials["<|eot_id|>"])
    ckpt = Checkpoint(config, silu.tensors, tok_files, silu.provenance)
    path = gguf.write(ckpt, tmp_path / "l3.gguf", outtype="tq2_0")
    (tmp_path / "hf").mkdir()
    check_tokenization(load(path), tok_files, tmp_path / "hf")
