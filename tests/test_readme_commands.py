"""The README's (and docs/formats.md's) command lines are the CLI's: every `bitnet-convert ...` line of their
```sh blocks, every inline
`bitnet-convert ...` or `<command> --option` span, and every inline `--option` span names a command and options
that exist, with values its choices accept; `--help` of each command so named runs (issue 24: the README said
`verify --levels parity` for an option spelled `--level`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bitnet_convert.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = (README, README.parent / "docs" / "formats.md")  # every document that shows the command line


def _sh_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        lines += [line for line in block.splitlines() if line.startswith("bitnet-convert ")]
    return lines


def _inline_spans(text: str) -> list[str]:
    """Inline code spans (a span may wrap a line), code blocks left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def _command_lines(text: str) -> list[str]:
    spans = _inline_spans(text)
    lines = _sh_lines(text) + [s for s in spans if s.startswith("bitnet-convert ")]
    # `verify --level parity`: a command named without the program, with an option
    lines += [f"bitnet-convert {s}" for s in spans if s.split()[0] in main.commands and "--" in s]
    return lines


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}


GLOBAL = _options(main)


def _problems(line: str) -> list[str]:
    code, _, comment = line.partition("  #")  # options named in the comment are the command's too
    words = shlex.split(code)[1:]
    while words and words[0] in GLOBAL:
        words.pop(0)
    if not words or words[0] not in main.commands:
        return [f"{line!r}: no command {words[:1]}"]
    command = main.commands[words[0]]
    known = _options(command)
    problems = []
    tokens = words[1:] + [w.rstrip(",;)") for w in comment.split()]
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, _, inline = token.partition("=")
        param = known.get(name)
        if param is None:
            problems.append(f"{line!r}: {words[0]} has no option {name}")
            continue
        value = inline or (tokens[i + 1] if i + 1 < len(tokens) else "")
        if isinstance(param.type, click.Choice) and value and not value.isupper() and not value.startswith("-"):
            wrong = [v for v in value.split("|") if v not in param.type.choices and v != "..."]
            if wrong:
                problems.append(f"{line!r}: {name} does not accept {wrong}")
    return problems


def test_the_readme_has_command_lines_to_check():
    lines = _command_lines(README.read_text())
    assert len(lines) >= 15 and any(span.startswith("--") for span in _inline_spans(README.read_text()))
    assert any(line.startswith("bitnet-convert verify --level") for line in lines)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_line_names_options_that_exist(doc):
    problems = [p for line in _command_lines(doc.read_text()) for p in _problems(line)]
    assert not problems, "\n".join(problems)


# Options the README names of its other programs: option -> the script that must define it.
# options of other programs the documents name, each with the file of ours that passes it
OTHER_PROGRAMS = {"--layers": "benchmarks/bench_embed.py", "--no-lazy": "tests/test_llama_cpp_converter.py",
                  "--start": "examples/finetune.py"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_inline_option_is_an_option_of_some_command(doc):
    every = set(GLOBAL) | {"--help"} | {opt for command in main.commands.values() for opt in _options(command)}
    named = {word.partition("=")[0] for span in _inline_spans(doc.read_text()) if span.startswith("--")
             for word in span.replace("/", " ").split() if word.startswith("--")}
    for option, script in OTHER_PROGRAMS.items():
        assert f'"{option}"' in (README.parent / script).read_text(), (option, script)
    assert not named - every - set(OTHER_PROGRAMS), sorted(named - every - set(OTHER_PROGRAMS))


@pytest.mark.parametrize("command", sorted({shlex.split(line.partition("  #")[0])[1] for line in _sh_lines(README.read_text())}))
def test_help_of_every_command_the_readme_runs(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
