"""The `bitnet-convert` command line: a thin shell over registry, verify and inspect.

Every X-to-Y command is generated from registry.FORMATS and each format's WRITER_OPTIONS; each command calls
the function of the same name in bitnet_convert.api, except `generate`: it streams the text as it is produced
(generate_command.run_generate), where api.generate returns the whole continuation.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from bitnet_convert import api, jsonout
from bitnet_convert.fileio.sources import printable, shown
from bitnet_convert.formats import registry
from bitnet_convert.formats.options import COUNT, FLAG, SIZE
from bitnet_convert.verification import DEFAULT_LEVELS, LEVELS, RUNTIMES
from bitnet_core import __version__, gcpause
from bitnet_core.errors import CheckFailed, ConvertError
from bitnet_core.pooling import POOLINGS

EXIT_FAILED_CHECK = 1  # verify / inspect --check found a difference
EXIT_BAD_INPUT = 2  # one error line: the input or the request is wrong
TEXT_FILE_LIMIT = 64 << 20  # characters `embed --file` reads (a million sentences): a device or a stray file stops
# generate / verify --head: bitnet_model.engine.HEAD_TYPES, spelled here so that --help does not import JAX
HEADS = ("stored", "int8")


class _Cli(click.Group):
    """Turns every error into one line on stderr and a non-zero exit; --debug keeps the traceback."""

    def main(self, args=None, *rest, **kwargs):
        if args is None:  # the process's own command line: it runs this one command, then exits (gcpause.py)
            gcpause.freeze_after_pauses()
        return super().main(args, *rest, **kwargs)

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
            click.echo(f"error: {printable(str(exc))}", err=True)  # one line, whatever a file name holds
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
            click.echo(f"error: {name}: {printable(str(exc.strerror or exc))}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # a bug, or input we did not foresee: still one line
            if debug:
                traceback.print_exc()
            first = printable(str(exc).splitlines()[0]) if str(exc) else ""
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
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine("warning: %(message)s"))
    logging.basicConfig(handlers=[handler], level=logging.DEBUG if debug else logging.WARNING)


class _OneLine(logging.Formatter):
    """A warning is one line too, whatever a file name in it holds."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _writer_options(fmt: str, with_defaults: bool):
    """click options for the writer of `fmt`, from its WRITER_OPTIONS."""
    decorators = []
    for name, option in registry.writer_options(fmt).items():
        flag = "--" + name.replace("_", "-")
        help = f"[{fmt} outputs] {option.help}"
        if option.kind == FLAG:
            decorators.append(click.option(flag, name, is_flag=True, help=help))
        elif option.kind in (SIZE, COUNT):  # checked by the writer: one error line for any value typed
            decorators.append(click.option(flag, name, default=None, metavar=option.kind.upper(), help=help))
        else:
            default = option.default if with_defaults else None
            decorators.append(click.option(flag, name, type=click.Choice(option.choices, case_sensitive=False),
                                           default=default, show_default=default is not None, help=help))
    return decorators


_common_source = [
    click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub repo id SRC."),
]
_common_output = [
    click.option("--force", is_flag=True, help="Overwrite OUT if it exists."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
                 help="A general.* key to store (name, author, license, description, ...; repeatable): recorded "
                      "in the provenance and covered by the content hash; a GGUF holds it as a key."),
    click.option("--dry-run", is_flag=True,
                 help="Read and check everything, print what would be written (tensors, types, shapes, bytes, "
                      "GGUF keys), write nothing."),
    click.option("--json", "as_json", is_flag=True, help="With --dry-run: print one JSON object."),
]


def _check_json(dry_run: bool, as_json: bool) -> None:
    """Before any work: --json describes a dry run (a conversion reports the path it wrote)."""
    if as_json and not dry_run:
        raise ConvertError("--json goes with --dry-run (a conversion reports the path it wrote)")


def _written(result, dry_run: bool, as_json: bool) -> None:
    """What a conversion reports: the path written (stderr), or a dry run's description (stdout)."""
    if not dry_run:
        click.echo(f"wrote {shown(result)}", err=True)
    elif as_json:
        click.echo(jsonout.dumps(result, indent=2))
    else:
        click.echo(_described(result))


def _described(d: dict) -> str:
    files = d["files"]
    lines = [f"would write   {d['output']}   ({d['format']}, {len(files)} file{'s' if len(files) > 1 else ''})"]
    lines += [f"  file        {name}" for name in files if len(files) > 1]
    if "architecture" in d:
        lines.append(f"architecture  {d['architecture']}")
        lines += [f"  {key} = {_one_line(value)}" for key, value in d["keys"].items()]
    lines += [f"metadata      {key} = {_one_line(value)}" for key, value in d["metadata"].items()]
    width = max((len(t["name"]) for t in d["tensors"]), default=6)
    lines.append(f"{'tensor':<{width}}  {'type':<8} {'shape':<16} {'bytes':>14}")
    for t in d["tensors"]:
        lines.append(f"{t['name']:<{width}}  {t['type']:<8} {'x'.join(map(str, t['shape'])):<16} {t['bytes']:>14,}")
    lines.append(f"total         {d['tensor_count']} tensors, {d['total_bytes']:,} bytes")
    return "\n".join(lines)


def _one_line(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _apply(decorators, func):
    for deco in reversed(decorators):
        func = deco(func)
    return func


_EXAMPLE_PATHS = {"hf": "./model-hf", "flax": "./model-flax", "npz": "./model.npz", "gguf": "./model.gguf"}


def _make_pair_command(src_fmt: str, dst_fmt: str) -> None:
    def command(src, out, revision, force, quiet, metadata, dry_run, as_json, **options):
        _check_json(dry_run, as_json)
        result = api.convert(src, out, src_format=src_fmt, dst_format=dst_fmt, revision=revision, force=force,
                             quiet=quiet, metadata=metadata, dry_run=dry_run, **options)
        _written(result, dry_run, as_json)

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


def convert_command(src, dst, src_format, dst_format, revision, force, quiet, metadata, dry_run, as_json, **options):
    """Convert SRC to DST, inferring both formats from the paths.

    \b
    Example:
      bitnet-convert convert ./model-hf ./model.gguf --target bitnet.cpp
      bitnet-convert convert ./model.gguf ./model-flax
      bitnet-convert convert ./model-hf ./model.gguf --dry-run
      bitnet-convert convert ./model-hf ./model.gguf --split-max-size 2G --metadata general.author=me
    """
    _check_json(dry_run, as_json)
    result = api.convert(src, dst, src_format=src_format, dst_format=dst_format, revision=revision, force=force,
                         quiet=quiet, metadata=metadata, dry_run=dry_run, **options)
    _written(result, dry_run, as_json)


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
@click.option("--bitnet-cpp-dir", "bitnet_cpp_dir", envvar="BITNET_CPP_DIR", default=None,
              help="With --runtime bitnet.cpp: the bitnet.cpp build to run (the folder holding build/ and "
                   "3rdparty/llama.cpp/include/llama.h; default: $BITNET_CPP_DIR).")
@click.option("--head", type=click.Choice(HEADS), default="stored", show_default=True,
              help="The function layer's engine head: int8 runs both sides as `generate --head int8` does and "
                   "reports what that declared cast changes against the stored head.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def verify_command(candidate, reference, revision, levels, runtime, bitnet_cpp_dir, head, as_json):
    """Prove that CANDIDATE holds the model REFERENCE holds: layer by layer, each reported.

    \b
      weights   every tensor exact in canonical form (ternary codes, multipliers, values), or equal to a cast the
                candidate's format declares (f16 / q8_0 embeddings, a bf16 weight_scale), its loss reported
      function  the JAX engine on both, same token batches: logits identical, bit for bit
      parity    the JAX model against transformers' BitNet on an HF REFERENCE: teacher-forced layer by layer
                with rounding ties accounted for, and end to end without activation quantization
      runtime   with --runtime: the GGUF run in llama.cpp, ik_llama.cpp or bitnet.cpp (your own build:
                --bitnet-cpp-dir) against the JAX model under that runtime's arithmetic

    Exit 0 when every layer that ran passed, 1 when one failed, 2 on bad input.

    \b
    Example:
      bitnet-convert verify ./model.gguf --reference ./model-hf
      bitnet-convert verify ./model-hf --reference ./model-hf --level all --json
      bitnet-convert verify ./model-tq2_0.gguf --reference ./model-hf --runtime llama.cpp
      bitnet-convert verify ./model-i2_s.gguf --reference ./model-hf --runtime bitnet.cpp --bitnet-cpp-dir ~/BitNet
    """
    result = api.verify(candidate, reference, revision=revision, levels=levels, runtime=runtime, head=head,
                        bitnet_cpp_dir=bitnet_cpp_dir)
    for warning in result.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
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
@click.option("--against", default=None, metavar="START",
              help="Also list per tensor what changed from START (codes flipped, multiplier before/after).")
def inspect_command(path, as_json, check, revision, against):
    """Show format, architecture, tensors (shapes, dtypes, sizes), ternary statistics and multipliers.

    \b
    Example:
      bitnet-convert inspect ./model.gguf
      bitnet-convert inspect --check --json ./model-flax
      bitnet-convert inspect ./finetuned-hf --against ./start-hf

    With --check: exit 0 when the recomputed content hash matches, 1 when it differs or a tensor holds bytes
    no writer produces, 2 when PATH cannot be read as a checkpoint at all.
    """
    from bitnet_core.errors import CorruptData

    try:
        report = api.inspect(path, check=check, revision=revision, against=against)
    except CorruptData as exc:
        if check:  # tensor bytes no writer produces: the file changed, so the check fails (exit 1, not 2)
            raise CheckFailed(str(exc)) from exc
        raise
    click.echo(jsonout.dumps(report.as_dict(), indent=2) if as_json else report.text())
    for warning in report.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
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
@click.option("--stats", is_flag=True, help="Print load, compilation, prefill and decode (median) times to stderr.")
@click.option("--head", type=click.Choice(HEADS), default="stored", show_default=True,
              help="int8: hold the embedding / output table as int8 rows with a scale each (half the bytes a "
                   "decode step reads for 2B4T's bf16 head; lossy, so logits differ from the stored model's).")
@click.option("--greedy-screen/--no-greedy-screen", default=None,
              help="Greedy decoding reads an int8 copy of the output table and re-scores exactly only the rows "
                   "that can still win: the same tokens, about half the bytes per step. The default wherever "
                   "decoding is greedy and the native CPU kernels run; --no-greedy-screen reads the whole table "
                   "every step.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object when done (prompt_ids, new_ids, text, stopped_at_eos, timings) "
                   "instead of streaming.")
def generate_command(src, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, revision, stats,
                     head, greedy_screen, as_json):
    """Generate text from SRC (any format) with the JAX model, streaming it to stdout as it is produced.

    Projections stay 2-bit packed in memory and compute exact W1.58A8 arithmetic. Stops at an end-of-sequence
    token. Without a tokenizer in SRC, the prompt is --prompt-ids and the output is token ids.

    \b
    Example:
      bitnet-convert generate ./2b4t-flax --prompt "User: How are you?<|eot_id|>Assistant: " --max-new-tokens 64
      bitnet-convert generate ./model.gguf --prompt-ids "128000 1502 25" --temperature 0.7 --top-p 0.9 --seed 1
    """
    if as_json:
        _generate_json(src, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, revision, stats,
                       head, greedy_screen)
        return
    from bitnet_convert.generate_command import run_generate

    def write(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    run_generate(src, prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, greedy=greedy,
                 temperature=temperature, top_p=top_p, seed=seed, revision=revision, write=write,
                 stats=(lambda timings: click.echo(timings.line(), err=True)) if stats else None, head=head,
                 screen=greedy_screen)


def _generate_json(src, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, revision, stats, head,
                   screen):
    """generate --json: api.generate's result as one strict-JSON object; every field beyond the ids, the text and
    the stop goes under "timings"."""
    import dataclasses

    from bitnet_convert.generate_command import parse_prompt_ids

    if (prompt is None) == (prompt_ids is None):
        raise ConvertError("give exactly one of --prompt and --prompt-ids")
    result = dataclasses.asdict(api.generate(
        src, prompt if prompt is not None else parse_prompt_ids(prompt_ids), max_new_tokens=max_new_tokens,
        greedy=greedy or None, temperature=temperature, top_p=top_p, seed=seed, revision=revision, head=head,
        screen=screen))
    document = {"prompt_ids": result.pop("prompt_ids"), "new_ids": result.pop("ids"), "text": result.pop("text"),
                "stopped_at_eos": result.pop("stopped_at_eos"), "timings": result}
    if stats:
        median = result["decode_median_s"]
        after = "no more" if median != median else f"{median * 1e3:.1f} ms/token after (median step)"  # NaN: none
        click.echo(f"compilation {result['compile_s']:.2f} s; prompt {len(document['prompt_ids'])} tokens: "
                   f"{result['prefill_s'] * 1e3:.0f} ms to the first new token; {after}", err=True)
    click.echo(jsonout.dumps(document))


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: {\"rows\": [...]}.")
def list_command(as_json):
    """Every format, HF layout, GGUF target, outtype and embedding type, and model family this tool reads and
    writes, with what runs each: one table, made from the code's own tables.

    \b
    Example:
      bitnet-convert list
      bitnet-convert list --json | jq '.rows[] | select(.kind == "outtype")'
    """
    from bitnet_convert import catalog

    if as_json:
        click.echo(jsonout.dumps({"kinds": list(catalog.KINDS), "rows": [r.as_dict() for r in catalog.rows()]}))
    else:
        click.echo(catalog.text())


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
                text = stream.read(TEXT_FILE_LIMIT + 1)  # bounded: `--file /dev/zero` has no end and no line
        except UnicodeDecodeError as exc:
            raise ConvertError(f"{shown(file)}: not UTF-8 text ({exc.reason})") from None
        if len(text) > TEXT_FILE_LIMIT:
            raise ConvertError(f"{shown(file)}: more than {TEXT_FILE_LIMIT >> 20} Mi characters of text; embed it in "
                               "parts")
        texts = [line for line in text.split("\n") if line.strip()]
        if not texts:
            raise ConvertError(f"{file}: has no non-empty lines")
    result = api.embed(src, list(texts), pooling=pooling, batch_size=batch_size, revision=revision)
    if as_json:
        click.echo(jsonout.dumps(result.as_dict()))
        return
    click.echo(f"pooling: {result.pooling} ({result.pooling_source})", err=True)
    for row in result.embeddings:
        click.echo(" ".join(f"{float(v):.8g}" for v in row))
