"""The `bitnet-convert` command line: a thin shell over registry, verify and inspect.

Every X-to-Y command is generated from registry.FORMATS and each format's WRITER_OPTIONS; each command calls
the function of the same name in bitnet_convert.api.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from bitnet_convert import api, jsonout
from bitnet_convert.fileio.sources import shown
from bitnet_convert.formats import registry
from bitnet_convert.verification import DEFAULT_LEVELS, LEVELS, RUNTIMES
from bitnet_core import __version__
from bitnet_core.errors import CheckFailed, ConvertError
from bitnet_core.pooling import POOLINGS

EXIT_FAILED_CHECK = 1  # verify / inspect --check found a difference
EXIT_BAD_INPUT = 2  # one error line: the input or the request is wrong
# generate / verify --head: bitnet_model.engine.HEAD_TYPES, spelled here so that --help does not import JAX
HEADS = ("stored", "int8")


class _Cli(click.Group):
    """Turns every error into one line on stderr and a non-zero exit; --debug keeps the traceback."""

    def invoke(self, ctx):
        # ctx.params, not sys.argv: main() may be called with its own argument list (tests, other programs)
        debug = bool(ctx.params.get("debug")) or os.environ.get("BITNET_CONVERT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except ConvertError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_FAILED_CHECK if isinstance(exc, CheckFailed) else EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `bitnet-convert inspect m.gguf | head -1`: the reader went away
            _discard_stdout()
            click.echo("error: standard output: closed before all output was written (broken pipe)", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except OSError as exc:  # the system refused a file operation no reader or writer turned into a message
            if debug:
                traceback.print_exc()
            name = shown(exc.filename) if exc.filename is not None else "a file operation"
            click.echo(f"error: {name}: {exc.strerror or exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # a bug, or input we did not foresee: still one line
            if debug:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            ctx.exit(EXIT_BAD_INPUT)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError (Python docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real descriptor (an in-process runner): nothing to flush
        pass


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bitnet-convert")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main(debug: bool) -> None:
    """Move BitNet b1.58 models between Hugging Face, Flax, packed-ternary .npz and GGUF, and prove nothing
    was lost.

    \b
    Example:
      bitnet-convert hf-to-flax microsoft/bitnet-b1.58-2B-4T ./2b4t-flax
      bitnet-convert verify ./2b4t-flax --reference microsoft/bitnet-b1.58-2B-4T
    """
    # Library warnings (a relu2 model exported for llama.cpp, degenerate weights) reach the user as one line each.
    logging.basicConfig(format="warning: %(message)s", level=logging.DEBUG if debug else logging.WARNING)


def _writer_options(fmt: str, with_defaults: bool):
    """click options for the writer of `fmt`, from its WRITER_OPTIONS."""
    decorators = []
    for name, option in registry.writer_options(fmt).items():
        flag = "--" + name.replace("_", "-")
        default = option.default if with_defaults else None
        decorators.append(click.option(flag, name, type=click.Choice(option.choices, case_sensitive=False),
                                       default=default, show_default=default is not None,
                                       help=f"[{fmt} outputs] {option.help}"))
    return decorators


_common_source = [
    click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub repo id SRC."),
]
_common_output = [
    click.option("--force", is_flag=True, help="Overwrite OUT if it exists."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
]


def _apply(decorators, func):
    for deco in reversed(decorators):
        func = deco(func)
    return func


_EXAMPLE_PATHS = {"hf": "./model-hf", "flax": "./model-flax", "npz": "./model.npz", "gguf": "./model.gguf"}


def _make_pair_command(src_fmt: str, dst_fmt: str) -> None:
    def command(src, out, revision, force, quiet, **options):
        path = api.convert(src, out, src_format=src_fmt, dst_format=dst_fmt, revision=revision, force=force,
                           quiet=quiet, **options)
        click.echo(f"wrote {path}", err=True)

    command.__doc__ = (
        f"Convert a {registry.FORMATS[src_fmt][1]} SRC into a {registry.FORMATS[dst_fmt][1]} OUT.\n\n"
        f"\b\nExample:\n  bitnet-convert {src_fmt}-to-{dst_fmt} "
        f"{'microsoft/bitnet-b1.58-2B-4T' if src_fmt == 'hf' else _EXAMPLE_PATHS[src_fmt]} {_EXAMPLE_PATHS[dst_fmt]}"
    )
    params = [click.argument("src"), click.argument("out")]
    params += _common_source + _common_output + _writer_options(dst_fmt, with_defaults=True)
    short = f"Convert {src_fmt} SRC to {dst_fmt} OUT."
    main.command(f"{src_fmt}-to-{dst_fmt}", short_help=short)(_apply(params, command))


for _src in registry.FORMATS:
    for _dst in registry.FORMATS:
        if _src != _dst:
            _make_pair_command(_src, _dst)


def _all_writer_options():
    seen, decorators = set(), []
    for fmt in registry.FORMATS:
        for deco, name in zip(_writer_options(fmt, with_defaults=False), registry.writer_options(fmt)):
            if name not in seen:
                seen.add(name)
                decorators.append(deco)
    return decorators


def convert_command(src, dst, src_format, dst_format, revision, force, quiet, **options):
    """Convert SRC to DST, inferring both formats from the paths.

    \b
    Example:
      bitnet-convert convert ./model-hf ./model.gguf --target bitnet.cpp
      bitnet-convert convert ./model.gguf ./model-flax
    """
    path = api.convert(src, dst, src_format=src_format, dst_format=dst_format, revision=revision, force=force,
                       quiet=quiet, **options)
    click.echo(f"wrote {path}", err=True)


main.command("convert")(_apply(
    [click.argument("src"), click.argument("dst"),
     click.option("--from", "src_format", type=click.Choice(list(registry.FORMATS)), default=None,
                  help="Format of SRC (default: detected from its contents)."),
     click.option("--to", "dst_format", type=click.Choice(list(registry.FORMATS)), default=None,
                  help="Format of DST (default: from its name: *.gguf, *.npz, *-flax folder, other folder = hf).")]
    + _common_source + _common_output + _all_writer_options(),
    convert_command,
))


@main.command("verify")
@click.argument("candidate")
@click.option("--reference", "reference", required=True,
              help="The checkpoint CANDIDATE was converted from (any format; a folder or hub id for parity).")
@click.option("--revision", default=None, help="Hub revision of the reference.")
@click.option("--level", "levels", default=",".join(DEFAULT_LEVELS), show_default=True,
              help=f"Layers to run, comma separated: {', '.join(LEVELS)}, or all.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
              help="Also load CANDIDATE (a GGUF) in this runtime and compare its logits with the JAX model's.")
@click.option("--head", type=click.Choice(HEADS), default="stored", show_default=True,
              help="The function layer's engine head: int8 runs both sides as `generate --head int8` does and "
                   "reports what that declared cast changes against the stored head.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def verify_command(candidate, reference, revision, levels, runtime, head, as_json):
    """Prove that CANDIDATE holds the model REFERENCE holds: layer by layer, each reported.

    \b
      weights   every tensor exact in canonical form (ternary codes, multipliers, values), or equal to a cast the
                candidate's format declares (f16 / q8_0 embeddings, a bf16 weight_scale), its loss reported
      function  the JAX engine on both, same token batches: logits identical, bit for bit
      parity    the JAX model against transformers' BitNet on an HF REFERENCE: teacher-forced layer by layer
                with rounding ties accounted for, and end to end without activation quantization
      runtime   with --runtime: the GGUF run in llama.cpp or ik_llama.cpp against the JAX model under that
                runtime's arithmetic

    Exit 0 when every layer that ran passed, 1 when one failed, 2 on bad input.

    \b
    Example:
      bitnet-convert verify ./model.gguf --reference ./model-hf
      bitnet-convert verify ./model-hf --reference ./model-hf --level all --json
      bitnet-convert verify ./model-tq2_0.gguf --reference ./model-hf --runtime llama.cpp
    """
    result = api.verify(candidate, reference, revision=revision, levels=levels, runtime=runtime, head=head)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(jsonout.dumps(result.as_dict()))
    else:
        click.echo(result.text())
    sys.exit(0 if result.passed else EXIT_FAILED_CHECK)


@main.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--check", is_flag=True, help="Recompute the recorded content hash; exit 1 if it differs.")
@click.option("--revision", default=None, help="Hub revision, when PATH is a hub repo id.")
def inspect_command(path, as_json, check, revision):
    """Show format, architecture, tensors (shapes, dtypes, sizes), ternary statistics and multipliers.

    \b
    Example:
      bitnet-convert inspect ./model.gguf
      bitnet-convert inspect --check --json ./model-flax

    With --check: exit 0 when the recomputed content hash matches, 1 when it differs or a tensor holds bytes
    no writer produces, 2 when PATH cannot be read as a checkpoint at all.
    """
    from bitnet_core.errors import CorruptData

    try:
        report = api.inspect(path, check=check, revision=revision)
    except CorruptData as exc:
        if check:  # tensor bytes no writer produces: the file changed, so the check fails (exit 1, not 2)
            raise CheckFailed(str(exc)) from exc
        raise
    click.echo(jsonout.dumps(report.as_dict(), indent=2) if as_json else report.text())
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if check and not report.check_passed:
        sys.exit(EXIT_FAILED_CHECK)


@main.command("generate")
@click.argument("src")
@click.option("--prompt", default=None, help="Prompt text (needs the checkpoint's tokenizer.json).")
@click.option("--prompt-ids", default=None, help='Prompt as token ids separated by spaces, e.g. "128000 1502 25".')
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Most tokens to generate.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (the default without --temperature).")
@click.option("--temperature", type=float, default=None, help="Sample from softmax(logits / T).")
@click.option("--top-p", type=float, default=None, help="Sample among the most likely tokens up to this total probability.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler (same seed, same text).")
@click.option("--revision", default=None, help="Hub revision, when SRC is a hub repo id.")
@click.option("--stats", is_flag=True, help="Print prefill time and decode speed to stderr.")
@click.option("--head", type=click.Choice(HEADS), default="stored", show_default=True,
              help="int8: hold the embedding / output table as int8 rows with a scale each (half the bytes a "
                   "decode step reads for 2B4T's bf16 head; lossy, so logits differ from the stored model's).")
@click.option("--greedy-screen", is_flag=True,
              help="Greedy decoding reads an int8 copy of the output table and re-scores exactly only the rows "
                   "that can still win: the same tokens, fewer bytes per step, one more byte per table value "
                   "in memory (0.33 GB for 2B4T).")
def generate_command(src, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, revision, stats,
                     head, greedy_screen):
    """Generate text from SRC (any format) with the JAX model, streaming it to stdout as it is produced.

    Projections stay 2-bit packed in memory and compute exact W1.58A8 arithmetic. Stops at an end-of-sequence
    token. Without a tokenizer in SRC, the prompt is --prompt-ids and the output is token ids.

    \b
    Example:
      bitnet-convert generate ./2b4t-flax --prompt "User: How are you?<|eot_id|>Assistant: " --max-new-tokens 64
      bitnet-convert generate ./model.gguf --prompt-ids "128000 1502 25" --temperature 0.7 --top-p 0.9 --seed 1
    """
    from bitnet_convert.generator import run_generate

    def write(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    run_generate(src, prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, greedy=greedy,
                 temperature=temperature, top_p=top_p, seed=seed, revision=revision, write=write,
                 stats=(lambda line: click.echo(line, err=True)) if stats else None, head=head,
                 screen=greedy_screen)


@main.command("embed")
@click.argument("src")
@click.option("--text", "texts", multiple=True, help="A text to embed (repeat for several).")
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Embed every line of this file ('-': standard input).")
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="Override the model's pooling (default: its 1_Pooling/config.json, else mean).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Texts per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (pooling, embeddings, token counts).")
@click.option("--revision", default=None, help="Hub revision, when SRC is a hub repo id.")
def embed_command(src, texts, file, pooling, batch_size, as_json, revision):
    """L2-normalized sentence embeddings of texts with a BitNet-embedding model (Qwen3 / Gemma3 backbone) in
    any format: one line of numbers per text, or --json. The pooling used is printed to stderr.

    \b
    Example:
      bitnet-convert embed ./bitnet-embedding-0.6b --text "a cat on a mat" --text "a dog on a log"
      bitnet-convert embed ./bitnet-embedding-270m.gguf --file sentences.txt --json > vectors.json
    """
    if bool(texts) == (file is not None):
        raise ConvertError("give the texts with --text (one or more) or --file, not both")
    if file is not None:
        stream = click.open_file(file, encoding="utf-8")
        try:
            with stream:
                texts = [line.rstrip("\n") for line in stream if line.strip()]
        except UnicodeDecodeError as exc:
            raise ConvertError(f"{file}: not UTF-8 text ({exc.reason})") from None
        if not texts:
            raise ConvertError(f"{file}: has no non-empty lines")
    result = api.embed(src, list(texts), pooling=pooling, batch_size=batch_size, revision=revision)
    if as_json:
        click.echo(jsonout.dumps(result.as_dict()))
        return
    click.echo(f"pooling: {result.pooling} ({result.pooling_source})", err=True)
    for row in result.embeddings:
        click.echo(" ".join(f"{float(v):.8g}" for v in row))
