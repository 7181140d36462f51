"""The base install converts between all four formats: without the `reference` extra (torch, transformers,
accelerate), every hf-to-X and X-to-hf command runs, verify's exact layers run, and a command that needs an extra
says which in one line. (optax, the `train` extra, cannot be hidden: flax.nnx itself imports it.)

The extras are hidden from a child process by an import hook (the packages are installed here for the rest of the
suite); README "Install" shows the same check in a fresh venv.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from bitnet_convert.formats import registry
from bitnet_convert.tiny import tiny_checkpoint

EXTRAS_ONLY = ("torch", "transformers", "accelerate")
HIDE = textwrap.dedent(f"""
    import sys
    class Hidden:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {EXTRAS_ONLY!r}:
                raise ImportError("hidden: not in the base install")
    sys.meta_path.insert(0, Hidden())
    from bitnet_convert.cli import main
    sys.argv = ["bitnet-convert", *sys.argv[1:]]
    main()
""")


def base(*args, cwd):
    return subprocess.run([sys.executable, "-c", HIDE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return registry.write_checkpoint(tiny_checkpoint(seed=9, num_hidden_layers=1), str(folder / "m-hf"), "hf")


@pytest.mark.parametrize("fmt, name", [("flax", "m-flax"), ("npz", "m.npz"), ("gguf", "m.gguf")])
def test_conversions_need_no_extra(source, fmt, name, tmp_path):
    out = tmp_path / name
    done = base(f"hf-to-{fmt}", source, out, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    back = base(f"{fmt}-to-hf", out, tmp_path / "back-hf", "--quiet", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    check = base("verify", tmp_path / "back-hf", "--reference", source, "--json", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["layers"]["function"]["max_abs_diff"] == 0.0


def test_parity_names_the_extra_it_needs(source, tmp_path):
    done = base("verify", source, "--reference", source, "--level", "parity", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: the transformers reference needs accelerate, which is not installed: "
        "pip install 'bitnet-convert[reference]'"]
