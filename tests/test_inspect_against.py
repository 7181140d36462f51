"""`inspect --against START`: per tensor, what changed from a starting checkpoint (codes, multiplier, values)."""

import json

import numpy as np
from click.testing import CliRunner

from bitnet_convert.cli import main
from bitnet_convert.formats import registry
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_core.checkpoint import Checkpoint, Ternary

FLIPPED = "model.layers.1.mlp.up_proj.weight"
NUDGED = "model.layers.0.input_layernorm.weight"


def changed_copy(ckpt: Checkpoint) -> Checkpoint:
    """The same model with 7 codes of one projection moved (-1 -> 0 -> 1 -> -1), its multiplier doubled, and 3
    values of one norm set to 2."""
    arrays = {e.name: e.load() for e in ckpt}
    t = arrays[FLIPPED]
    codes = t.codes.copy()
    codes.reshape(-1)[:70:10] = (codes.reshape(-1)[:70:10] + 2) % 3 - 1
    arrays[FLIPPED] = Ternary(codes, np.float32(t.multiplier * 2))
    norm = arrays[NUDGED].astype(np.float32)
    norm[[0, 5, 9]] = 2.0
    arrays[NUDGED] = norm.astype(arrays[NUDGED].dtype)
    return Checkpoint.from_arrays(ckpt.config, arrays, tokenizer_files=ckpt.tokenizer_files)


def test_against_lists_codes_flipped_multipliers_and_values(tmp_path):
    start = tiny_checkpoint(seed=3)
    before = registry.write_checkpoint(start, str(tmp_path / "start-hf"), "hf", scale_dtype="f32")
    after = registry.write_checkpoint(changed_copy(start), str(tmp_path / "after.gguf"), "gguf")
    result = CliRunner().invoke(main, ["inspect", "--json", str(after), "--against", str(before)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    changes = {c["name"]: c for c in report["changes"]}
    assert report["against"] == str(before) and len(changes) == len(start.tensors)
    moved = {n for n, c in changes.items() if c["changed"] or c["multiplier_before"] != c["multiplier_after"]}
    assert moved == {FLIPPED, NUDGED}
    multiplier = float(start[FLIPPED].load().multiplier)
    assert changes[FLIPPED] == {"name": FLIPPED, "changed": 7, "total": 512 * 256, "multiplier_before": multiplier,
                                     "multiplier_after": 2 * multiplier, "max_abs_change": None}
    old = start[NUDGED].load().astype(np.float32)[[0, 5, 9]]
    assert changes[NUDGED]["changed"] == 3 and changes[NUDGED]["max_abs_change"] == float(np.abs(2.0 - old).max())

    text = CliRunner().invoke(main, ["inspect", str(after), "--against", str(before)]).output
    assert f"2 of {len(start.tensors)} tensors changed" in text
    assert f"7 of 131,072 codes flipped (0.01%)  multiplier {multiplier:.6g} -> {2 * multiplier:.6g}" in text


def test_against_a_model_of_another_shape_is_one_error_line(tmp_path):
    a = registry.write_checkpoint(tiny_checkpoint(seed=3), str(tmp_path / "a.npz"), "npz")
    b = registry.write_checkpoint(tiny_checkpoint(seed=3, num_hidden_layers=1), str(tmp_path / "b.npz"), "npz")
    result = CliRunner().invoke(main, ["inspect", str(a), "--against", str(b)])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "b.npz" in result.output
