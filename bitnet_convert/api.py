"""The Python front door: every command of the CLI as a function with the same arguments, returning Python values.

    import bitnet_convert
    bitnet_convert.convert("microsoft/bitnet-b1.58-2B-4T", "2b4t.gguf", target="bitnet.cpp")
    report = bitnet_convert.verify("2b4t.gguf", reference="microsoft/bitnet-b1.58-2B-4T")
    model = bitnet_convert.load_model("2b4t.gguf")
    text = bitnet_convert.generate("2b4t.gguf", "User: Hi<|eot_id|>Assistant: ", max_new_tokens=16).text

Errors are `bitnet_core.errors.ConvertError` (bad input, one line naming the file); the CLI prints them and exits 2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from bitnet_convert.formats import registry
from bitnet_core.checkpoint import Checkpoint
from bitnet_core.errors import ConvertError

PathLike = str | os.PathLike


def read(src: PathLike, *, format: str | None = None, revision: str | None = None) -> Checkpoint:
    """The checkpoint at SRC (a path in any format, or a hub repo id), lazy: tensors load when asked for."""
    return registry.read_checkpoint(os.fspath(src), format, revision)


def write(ckpt: Checkpoint, dst: PathLike, *, format: str | None = None, force: bool = False, quiet: bool = True,
          **format_options) -> Path | dict:
    """Write CKPT to DST as FORMAT (default: from DST's name); format options as the CLI's (`target="bitnet.cpp"`,
    `metadata={"general.author": "..."}`, `split_max_tensors=100`); `dry_run=True` writes nothing and returns
    what would be written (files, tensors, total bytes, GGUF keys) as a dict."""
    dst = os.fspath(dst)
    return registry.write_checkpoint(ckpt, dst, format or registry.infer_output_format(dst), force=force,
                                     quiet=quiet, **format_options)


def convert(src: PathLike, dst: PathLike, *, src_format: str | None = None, dst_format: str | None = None,
            revision: str | None = None, force: bool = False, quiet: bool = True, **format_options) -> Path | dict:
    """`bitnet-convert convert SRC DST`: read SRC (any format) and write DST; returns the path written (the
    first file of a split GGUF), or with `dry_run=True` what would be written (as `write`)."""
    return registry.convert(os.fspath(src), os.fspath(dst), src_format, dst_format, revision=revision,
                            force=force, quiet=quiet, **format_options)


def verify(candidate: PathLike, reference: PathLike, *, revision: str | None = None, levels=None,
           runtime: str | None = None, head: str = "stored", bitnet_cpp_dir: PathLike | None = None):
    """`bitnet-convert verify`: the VerifyReport (`.passed`, `.layers`, `.as_dict()`) of CANDIDATE against
    REFERENCE; `levels` as the CLI's --level ("weights,function" by default, "all"), `runtime` its --runtime,
    `head` its --head, `bitnet_cpp_dir` its --bitnet-cpp-dir (default: $BITNET_CPP_DIR)."""
    from bitnet_convert.verification import run_verify

    return run_verify(os.fspath(candidate), os.fspath(reference), revision=revision, levels=levels,
                      runtime=runtime, head=head, bitnet_cpp_dir=bitnet_cpp_dir)


def inspect(path: PathLike, *, check: bool = False, revision: str | None = None, against: PathLike | None = None):
    """`bitnet-convert inspect`: the InspectReport (`.as_dict()`, `.text()`, `.check_passed` with check=True;
    `.changes` per tensor from the checkpoint `against`)."""
    from bitnet_convert.inspection import inspect_path

    return inspect_path(os.fspath(path), check=check, revision=revision,
                        against=None if against is None else os.fspath(against))


def load_model(src: PathLike, *, mode: str = "inference", revision: str | None = None):
    """The JAX reference model (`bitnet_model.BitNetForCausalLM`) of any checkpoint this tool reads."""
    from bitnet_model.params import model_from_checkpoint

    return model_from_checkpoint(read(src, revision=revision), mode=mode)


@dataclasses.dataclass
class Generated:
    """What `generate` returns: the new token ids, their text (None without a tokenizer) and the timings."""

    prompt_ids: list[int]
    ids: list[int]
    text: str | None
    stopped_at_eos: bool
    prefill_s: float
    decode_s_per_token: float
    decode_median_s: float  # the steady state: the median step
    compile_s: float  # compiling (or loading from the persistent cache) before the prompt went in


def generate(src: PathLike, prompt: str | Sequence[int], *, max_new_tokens: int = 32, greedy: bool | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int = 0,
             revision: str | None = None, head: str = "stored", screen: bool | None = None) -> Generated:
    """`bitnet-convert generate`: continue PROMPT (text, or token ids) with the packed engine.

    Greedy unless `temperature` or `top_p` is given (as the CLI); `head="int8"` as `generate --head int8`,
    `screen=True` / `False` as `generate --greedy-screen` / `--no-greedy-screen` (None: the default, the screen
    wherever decoding is greedy and the native kernels run)."""
    from bitnet_convert.generate_command import check_screen, load_generator, sampling_request

    sampling = sampling_request(greedy, temperature, top_p)
    check_screen(screen, sampling)
    gen = load_generator(os.fspath(src), revision=revision, head=head, screen=screen, greedy=sampling["greedy"])
    ids = gen.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    result = gen.generate(ids, max_new_tokens, **sampling, seed=seed)
    text = None if gen.tokenizer is None else gen.tokenizer.decode(result.new_ids, skip_special_tokens=True)
    return Generated(ids, list(result.new_ids), text, result.stopped_at_eos, result.prefill_s,
                     result.decode_s_per_token, result.decode_median_s, result.compile_s)


def embed(src: PathLike, texts: str | Sequence[str] | None = None, *, token_ids: Sequence[Sequence[int]] | None = None,
          pooling: str | None = None, batch_size: int = 32, revision: str | None = None):
    """`bitnet-convert embed`: L2-normalized sentence embeddings of `texts` (or of `token_ids`, used as given)
    with a BitNet-embedding model in any format -> `Embedded` (.embeddings [N, H] float32, .pooling and
    .pooling_source: the config's pooling, else the documented default mean, or `pooling`)."""
    from bitnet_convert.embed_command import Embedded, load_embedder

    if (texts is None) == (token_ids is None):
        raise ConvertError("embed takes texts or token_ids (one of the two)")
    if batch_size <= 0:
        raise ConvertError(f"batch size must be positive, not {batch_size}")
    embedder = load_embedder(src, pooling=pooling, revision=revision)
    if texts is not None:
        return embedder.embed_texts([texts] if isinstance(texts, str) else list(texts), batch_size)
    sequences = [[int(t) for t in ids] for ids in token_ids]
    return Embedded(embedder.embed_ids(sequences, batch_size), embedder.pooling, embedder.pooling_source,
                    [len(s) for s in sequences])


__all__ = ["ConvertError", "Generated", "convert", "embed", "generate", "inspect", "load_model", "read", "verify",
           "write"]
