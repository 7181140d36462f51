"""`generate`: greedy decoding equals step-by-step argmax of the reference, seeded sampling, the CLI."""

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_convert import api

from bitnet_convert import generate_command as generate
from bitnet_convert.cli import main
from bitnet_convert.formats import flax_dir
from bitnet_convert.tiny import tiny_checkpoint
from bitnet_model import engine, generation, native, params

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(seed=4, **SMALL)


@pytest.fixture(scope="module")
def gen(ckpt):
    cfg = params.model_from_checkpoint(ckpt).config
    return generation.Generator(cfg, engine.weights_from_checkpoint(ckpt),
                              tokenizer=generate.load_tokenizer(ckpt.tokenizer_files),
                              eos_ids=generate.eos_token_ids(ckpt.config, ckpt.tokenizer_files))


@pytest.fixture(scope="module")
def folder(ckpt, tmp_path_factory):
    return flax_dir.write(ckpt, str(tmp_path_factory.mktemp("gen") / "tiny-flax"))


def test_greedy_is_the_argmax_of_the_full_forward_after_each_prefix(ckpt, gen):
    model = params.model_from_checkpoint(ckpt)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, gen.cfg.vocab_size, 11)]
    gen.eos_ids = set()  # run all steps
    result = gen.generate(prompt, 10)
    assert len(result.new_ids) == 10 and not result.stopped_at_eos
    sequence = np.asarray([prompt + result.new_ids], np.int32)
    full = params.logits(model, sequence[:, :-1])  # [1, T-1, V]
    np.testing.assert_array_equal(result.new_ids, full[0, len(prompt) - 1 :].argmax(-1))


def test_generation_stops_at_eos(gen):
    prompt = [5, 6, 7]
    gen.eos_ids = set()
    free = gen.generate(prompt, 6).new_ids
    gen.eos_ids = {free[2]}
    stopped = gen.generate(prompt, 6)
    assert stopped.stopped_at_eos and stopped.new_ids == free[: free.index(free[2]) + 1]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(gen):
    gen.eos_ids = set()
    prompt = [3, 1, 4, 1, 5]
    runs = [gen.generate(prompt, 12, greedy=False, temperature=1.5, top_p=0.95, seed=s).new_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    greedy = gen.generate(prompt, 12).new_ids
    tiny_p = gen.generate(prompt, 12, greedy=False, temperature=1.0, top_p=1e-6, seed=9).new_ids
    assert tiny_p == greedy  # top-p that keeps only the most likely token is greedy


def test_sample_keeps_the_nucleus():
    import jax
    import jax.numpy as jnp

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    drawn = {int(generation.sample(logits, jax.random.key(s), 1.0, 0.7, greedy=False)[0]) for s in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 needs the second token, never the third


def test_text_stream_emits_whole_characters(gen):
    pieces = []
    stream = generation._TextStream(gen.tokenizer, pieces.append)
    ids = gen.tokenizer.encode("naïve fox", add_special_tokens=False).ids
    for token in ids:
        stream.add(token)
    stream.flush()
    assert "".join(pieces) == gen.tokenizer.decode(ids) and "\ufffd" not in "".join(pieces)


def test_cli_with_prompt_text_and_ids(folder, ckpt, gen):
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(folder), "--prompt", "The quick brown fox", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    prompt = gen.encode("The quick brown fox")
    gen.eos_ids = generate.eos_token_ids(ckpt.config, ckpt.tokenizer_files)
    expected = gen.generate(prompt, 5).new_ids
    assert result.output == gen.tokenizer.decode(expected, skip_special_tokens=True) + "\n"

    result = runner.invoke(main, ["generate", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "4",
                                  "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    again = runner.invoke(main, ["generate", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "4",
                                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    assert result.exit_code == 0 and result.output == again.output and result.output.endswith("\n")


def test_cli_errors_are_one_line(folder):
    runner = CliRunner()
    both = runner.invoke(main, ["generate", str(folder), "--prompt", "a", "--prompt-ids", "1"])
    assert both.exit_code == 2 and "exactly one" in both.output
    bad = runner.invoke(main, ["generate", str(folder), "--prompt-ids", "1 x"])
    assert bad.exit_code == 2 and "integers" in bad.output
    out_of_vocab = runner.invoke(main, ["generate", str(folder), "--prompt-ids", "999999"])
    assert out_of_vocab.exit_code == 2 and "vocabulary" in out_of_vocab.output
    mixed = runner.invoke(main, ["generate", str(folder), "--prompt-ids", "1", "--greedy", "--temperature", "1"])
    assert mixed.exit_code == 2 and "--greedy" in mixed.output


def test_ids_are_streamed_without_a_tokenizer(tmp_path):
    bare = tiny_checkpoint(seed=4, **SMALL)
    bare.tokenizer_files.clear()
    out = flax_dir.write(bare, str(tmp_path / "bare-flax"))
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", "1 2 3", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert len(result.output.split()) == 3 and all(t.isdigit() for t in result.output.split())
    no_text = CliRunner().invoke(main, ["generate", str(out), "--prompt", "hello"])
    assert no_text.exit_code == 2 and "tokenizer" in no_text.output


def test_stats_name_the_kernels_that_ran(folder):
    from bitnet_model import native

    result = CliRunner().invoke(main, ["generate", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "3",
                                       "--stats"])
    assert result.exit_code == 0, result.output
    want = f"products: native {native.level()}" if native.available() else f"products: XLA ({native.reason()})"
    assert "ms to the first new token" in result.stderr and want in result.stderr


def test_the_int8_head_generates_and_says_so(folder):
    """generate --head int8: the opt-in lossy head runs end to end and --stats names it."""
    result = CliRunner().invoke(main, ["generate", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "4",
                                       "--head", "int8", "--stats"])
    assert result.exit_code == 0, result.output
    assert "int8 head (lossy)" in result.stderr
    generated = api.generate(folder, [1, 2, 3], max_new_tokens=4, head="int8")
    assert 1 <= len(generated.ids) <= 4 and all(0 <= t < 384 for t in generated.ids)


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")
def test_the_greedy_screen_gives_the_same_tokens(ckpt, gen):
    """Greedy decoding through the screen (engine.with_screen) is the stored head's argmax, step for step."""
    screened = generation.Generator(gen.cfg, engine.with_screen(gen.weights), tokenizer=gen.tokenizer)
    assert screened.products().endswith("; greedy screen")
    gen.eos_ids = set()
    rng = np.random.default_rng(3)
    for length in (1, 5, 17):
        prompt = [int(t) for t in rng.integers(0, gen.cfg.vocab_size, length)]
        assert screened.generate(prompt, 24).new_ids == gen.generate(prompt, 24).new_ids


def test_the_cli_greedy_screen_says_so(folder):
    """The screen is greedy decoding's default where the native kernels run; --no-greedy-screen reads the whole
    table every step: the same tokens either way. Asked for with sampling or the int8 head, it is refused."""
    def run(*extra):
        return CliRunner().invoke(main, ["generate", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "6",
                                         "--stats", *extra])

    asked, default, full = run("--greedy-screen"), run(), run("--no-greedy-screen")
    assert {asked.exit_code, default.exit_code, full.exit_code} == {0}, asked.output + default.output + full.output
    assert asked.stdout == default.stdout == full.stdout
    assert "greedy screen" in asked.stderr and "greedy screen" not in full.stderr
    assert ("greedy screen" in default.stderr) == native.available()
    sampled_by_default = run("--temperature", "0.7")
    assert sampled_by_default.exit_code == 0 and "greedy screen" not in sampled_by_default.stderr
    both = CliRunner().invoke(main, ["generate", str(folder), "--prompt-ids", "1", "--greedy-screen", "--head", "int8"])
    assert both.exit_code == 2 and "error: --greedy-screen screens the stored head" in both.output
    sampled = CliRunner().invoke(main, ["generate", str(folder), "--prompt-ids", "1", "--greedy-screen",
                                        "--temperature", "0.7"])
    assert sampled.exit_code == 2 and "error: --greedy-screen is for greedy decoding" in sampled.output


def test_the_cli_offers_the_engines_heads():
    from bitnet_convert import cli
    from bitnet_model import engine

    assert cli.HEADS == engine.HEAD_TYPES
