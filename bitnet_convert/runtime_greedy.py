"""Greedy continuation of token ids in a real runtime: llama.cpp, ik_llama.cpp or bitnet.cpp.

    greedy("llama.cpp", "model-tq2_0.gguf", prompt_ids, 32) -> [new token ids]

llama.cpp and ik_llama.cpp run in a process of their own (`python -m bitnet_convert.runtime_greedy`), as the
verify runtime layer runs them: they print their loaders' logs and can die on a file they cannot run. ik_llama.cpp
runs bitnet.cpp's I2_S files after its llama-quantize turns them into IQ2_BN (verification/runtime.py).
bitnet.cpp runs through `bitnet_convert.verification.bitnet_cpp`. Each step takes the largest logit (the first
of equal ones, as numpy's and JAX's argmax), with no sampler in between; llama.cpp and ik_llama.cpp run all
`max_new_tokens` steps, bitnet.cpp stops after an end-of-generation token, as JAX's generate does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bitnet_core.errors import ConvertError

RUNTIMES = ("llama.cpp", "ik_llama.cpp", "bitnet.cpp")
PACKAGES = {"llama.cpp": "llama_cpp", "ik_llama.cpp": "ik_llama_cpp"}
THREADS = 2
TIMEOUT_S = 600


def available(runtime: str) -> str | None:
    """None when `runtime` can run here, else why not (one phrase)."""
    if runtime == "bitnet.cpp":  # whether a build is there, its runner says when asked to run (ConvertError)
        try:
            from bitnet_convert.verification import bitnet_cpp  # noqa: F401
        except ImportError:
            return "this version has no bitnet.cpp runner"
        return None
    import importlib.util

    if importlib.util.find_spec(PACKAGES[runtime]) is None:
        extra = {"llama.cpp": "llama", "ik_llama.cpp": "ik-llama"}[runtime]
        return f"not installed (pip install 'bitnet-convert[{extra}]')"
    return None


def greedy(runtime: str, path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The runtime's greedy continuation of `prompt_ids` (max_new_tokens ids); ConvertError when it cannot run."""
    if runtime == "bitnet.cpp":
        try:
            from bitnet_convert.verification import bitnet_cpp
        except ImportError as exc:
            raise ConvertError("this version has no bitnet.cpp runner") from exc
        return [int(t) for t in bitnet_cpp.greedy(path, list(prompt_ids), max_new_tokens)]
    with tempfile.TemporaryDirectory(prefix="bitnet-greedy-") as tmp:
        model_path = _loadable(runtime, path, Path(tmp))
        out = Path(tmp) / "ids.json"
        try:
            done = subprocess.run([sys.executable, "-m", "bitnet_convert.runtime_greedy", runtime, model_path,
                                   ",".join(map(str, prompt_ids)), str(max_new_tokens), str(out)],
                                  capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            raise ConvertError(f"{path}: {runtime} did not finish within {TIMEOUT_S} s") from None
        if done.returncode != 0 or not out.is_file():
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            last = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise ConvertError(f"{path}: {runtime} could not run the file ({how}): {last[0]}")
        return json.loads(out.read_text())


def _loadable(runtime: str, path: str, tmp: Path) -> str:
    """The file the runtime loads: ours as it is, or for ik_llama.cpp an I2_S file requantized to IQ2_BN."""
    if runtime != "ik_llama.cpp":
        return path
    from bitnet_convert import api
    from bitnet_convert.verification.report import LayerReport
    from bitnet_convert.verification.runtime import loadable_file
    from bitnet_core.config import ModelConfig

    ckpt = api.read(path)
    report = LayerReport("runtime", False)
    prepared = loadable_file(path, ckpt, runtime, ModelConfig.from_hf(ckpt.config), tmp, report)
    if prepared is None:
        raise ConvertError(f"{path}: {'; '.join(report.failures)}")
    return prepared


# ----------------------------------------------------------------------------- in the runtime's own process
def _llama_cpp(path: str, ids: list[int], n: int) -> list[int]:
    import llama_cpp

    from bitnet_convert.verification.runtime_worker import GGML_TYPE_F32

    size = max(64, len(ids) + n)
    llm = llama_cpp.Llama(model_path=path, n_ctx=size, n_batch=size, n_threads=THREADS, logits_all=True,
                          flash_attn=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_gpu_layers=0,
                          verbose=False)
    out: list[int] = []
    llm.eval(ids)
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def _ik_llama_cpp(path: str, ids: list[int], n: int) -> list[int]:
    from ik_llama_cpp import _internals as ik

    model = ik.IkModel(path)
    context = ik.IkContext(model, n_ctx=max(64, len(ids) + n), n_threads=THREADS, flash_attn=False)
    batch = ik.make_batch_range(ids, logits_last=True)
    out: list[int] = []
    for step in range(n):
        if context.decode(batch) != 0:
            raise RuntimeError("ik_llama.cpp could not decode the batch")
        logits = np.ctypeslib.as_array(context.get_logits(-1), shape=(model.n_vocab,))
        out.append(int(np.argmax(logits)))
        batch = ik.make_batch_single(out[-1], len(ids) + step)
    return out


def main(argv: list[str]) -> int:
    runtime, path, ids, n, out = argv
    run = {"llama.cpp": _llama_cpp, "ik_llama.cpp": _ik_llama_cpp}[runtime]
    Path(out).write_text(json.dumps(run(path, [int(t) for t in ids.split(",")], int(n))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
