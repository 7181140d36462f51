"""The command table: every X-to-Y pair, `convert` inference, help texts with examples."""

import itertools

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_convert.cli import main
from bitnet_convert.formats import registry
from bitnet_core.checkpoint import Ternary
from bitnet_core.errors import ConvertError

PAIRS = [f"{a}-to-{b}" for a, b in itertools.permutations(registry.FORMATS, 2)]


def test_all_twelve_pair_commands_exist():
    assert len(PAIRS) == 12
    assert set(PAIRS) <= set(main.commands)


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "bitnet-convert" in result.output


@pytest.mark.parametrize(
    "path, fmt",
    [("out.gguf", "gguf"), ("a/b/model.NPZ", "npz"), ("x-flax", "flax"), ("x.flax", "flax"), ("x_flax", "flax"),
     ("model-hf", "hf"), ("2b4t", "hf")],
)
def test_output_format_inferred_from_the_name(path, fmt):
    assert registry.infer_output_format(path) == fmt


def test_output_format_that_cannot_be_inferred_is_an_error():
    with pytest.raises(ConvertError, match="--to"):
        registry.infer_output_format("model.bin")


def _codes(ckpt):
    return {e.name: e.load().codes for e in ckpt if e.kind == "ternary"}


def test_convert_chain_infers_formats_and_keeps_every_code(hf_checkpoint, tmp_path):
    src = hf_checkpoint("autobitlinear")
    runner = CliRunner()
    chain = [str(src), str(tmp_path / "m.gguf"), str(tmp_path / "m.npz"), str(tmp_path / "m-flax"),
             str(tmp_path / "m-hf")]
    for a, b in zip(chain, chain[1:]):
        result = runner.invoke(main, ["convert", a, b, "--quiet"])
        assert result.exit_code == 0, result.output
    assert [registry.detect_input_format(p) for p in chain] == ["hf", "gguf", "npz", "flax", "hf"]
    first, last = registry.read_checkpoint(chain[0]), registry.read_checkpoint(chain[-1])
    for name, codes in _codes(first).items():
        np.testing.assert_array_equal(codes, _codes(last)[name])
        assert first[name].load().multiplier == last[name].load().multiplier


def test_writer_options_only_apply_to_their_format(hf_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(hf_checkpoint()), str(tmp_path / "m.npz"), "--target", "bitnet.cpp"])
    assert result.exit_code == 2
    assert "--target does not apply to npz outputs" in result.output
    assert not (tmp_path / "m.npz").exists()


def test_pair_command_passes_writer_options(hf_checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["hf-to-gguf", str(hf_checkpoint()), str(out), "--target", "bitnet.cpp", "-q"])
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    reader = GGUFReader(out)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "bitnet-b1.58"
    assert any(t.tensor_type == 36 for t in reader.tensors)  # I2_S


def test_refuses_to_overwrite_without_force(hf_checkpoint, tmp_path):
    out = tmp_path / "m.npz"
    out.write_bytes(b"precious")
    result = CliRunner().invoke(main, ["hf-to-npz", str(hf_checkpoint()), str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"precious"
    # --force replaces only an output of ours (issue 15): a file of someone else's stays, byte for byte
    result = CliRunner().invoke(main, ["hf-to-npz", str(hf_checkpoint()), str(out), "--force", "-q"])
    assert result.exit_code == 2 and out.read_bytes() == b"precious"
    out.unlink()
    assert CliRunner().invoke(main, ["hf-to-npz", str(hf_checkpoint()), str(out), "-q"]).exit_code == 0
    result = CliRunner().invoke(main, ["hf-to-npz", str(hf_checkpoint()), str(out), "--force", "-q"])
    assert result.exit_code == 0
    assert isinstance(registry.read_checkpoint(str(out))["model.layers.0.mlp.up_proj.weight"].load(), Ternary)


@pytest.mark.parametrize("layout", ["bitlinear", "online"])
def test_the_pair_commands_keep_the_layout_the_model_came_in(layout, hf_checkpoint, tmp_path):
    """hf-to-flax then flax-to-hf (no --layout) gives back the source's layout, as `convert --to hf` does: the
    same quantization_config, and the same tensors bit for bit (bf16 masters stay masters)."""
    import json

    from safetensors.numpy import load_file

    src = hf_checkpoint(layout)
    runner = CliRunner()
    flax, back = tmp_path / "m-flax", tmp_path / "back"
    for argv in (["hf-to-flax", str(src), str(flax)], ["flax-to-hf", str(flax), str(back)]):
        result = runner.invoke(main, [*argv, "-q"])
        assert result.exit_code == 0, result.output
    config = json.loads((back / "config.json").read_text())
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    original, returned = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(returned) == sorted(original)
    for name, array in original.items():
        assert returned[name].dtype == array.dtype and returned[name].tobytes() == array.tobytes(), name


def test_the_layout_option_says_the_default_is_the_sources_and_names_every_layout():
    from bitnet_convert.formats.hf import LAYOUTS

    for command in ("flax-to-hf", "npz-to-hf", "gguf-to-hf", "convert"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "default: the source's layout" in text, command
        assert "default: autobitlinear" not in text
        for name in LAYOUTS:
            assert f"{name}:" in text, (command, name)


def test_list_shows_every_table_entry_the_code_has():
    """`list` is made from the code's own tables: every format, layout, target, outtype, embed type and family."""
    import json

    from bitnet_convert.formats import hf
    from bitnet_convert.formats.gguf import types as gguf_types
    from bitnet_core.config import BITNET_ARCHITECTURES

    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    names = {kind: [r["name"] for r in rows if r["kind"] == kind] for kind in {r["kind"] for r in rows}}
    assert names == {"format": list(registry.FORMATS), "layout": list(hf.LAYOUTS),
                     "gguf-target": list(gguf_types.TARGETS), "outtype": list(gguf_types.OUTTYPES),
                     "embed-type": list(gguf_types.EMBED_TYPES), "family": list(BITNET_ARCHITECTURES)}
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name["outtype", "i2_s"]["runs_in"] == "bitnet.cpp"
    assert by_name["gguf-target", "bitnet.cpp"]["runs_in"].startswith("bitnet.cpp; checked by verify --runtime ")
    assert "ik_llama.cpp" in by_name["gguf-target", "bitnet.cpp"]["runs_in"]  # it runs bitnet.cpp's I2_S files
    assert by_name["gguf-target", "llama.cpp"]["runs_in"] == "llama.cpp; checked by verify --runtime llama.cpp"
    assert "llama.cpp bitnet, which computes silu: another function" in by_name["family", "BitNetForCausalLM"]["runs_in"]
    assert "bitnet.cpp qwen3 (i2_s)" in by_name["family", "Qwen3Model"]["runs_in"]
    text = CliRunner().invoke(main, ["list"]).output.splitlines()
    assert len(text) == 1 + len(rows) and text[0].split()[:4] == ["kind", "name", "reads", "writes"]


def test_generate_json_reports_ids_text_and_timings(hf_checkpoint):
    import json

    src = str(hf_checkpoint())
    streamed = CliRunner().invoke(main, ["generate", src, "--prompt-ids", "1 2 3", "--max-new-tokens", "4"])
    result = CliRunner().invoke(main, ["generate", src, "--prompt-ids", "1 2 3", "--max-new-tokens", "4", "--json"])
    assert streamed.exit_code == 0 and result.exit_code == 0, result.output
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json"))
    assert report["prompt_ids"] == [1, 2, 3] and 1 <= len(report["new_ids"]) <= 4
    assert set(report) == {"prompt_ids", "new_ids", "text", "stopped_at_eos", "timings"}
    assert report["timings"]["prefill_s"] > 0 and "decode_s_per_token" in report["timings"]
    if report["text"] is None:  # no tokenizer: the streamed output is the same ids
        assert streamed.stdout.split() == [str(i) for i in report["new_ids"]]
    else:
        assert streamed.stdout.rstrip("\n") == report["text"]


def test_messages_escape_what_a_terminal_would_not_show():
    from bitnet_convert.fileio.sources import printable, shown

    assert printable("a\nb\tc\x1b[31m\udcff é") == "a\\nb\\tc\\x1b[31m\\udcff é"
    assert shown("") == "''" and shown("plain/path.gguf") == "plain/path.gguf"
