"""Logits of a GGUF file in a real runtime, in a process of its own (the verify runtime layer runs this).

    python -m bitnet_convert.verification.runtime_worker RUNTIME MODEL.gguf IDS OUT.npy

A process of its own because the runtimes print their loaders' logs to the process's stderr and can die on a file
they cannot run (ik_llama.cpp raises SIGFPE on TQ types): the caller then reports one line, not a crash.
IDS: token ids separated by commas. OUT.npy: float32 [len(ids), vocab], the logits at every position.
"""

from __future__ import annotations

import sys

import numpy as np

GGML_TYPE_F32 = 0  # llama.cpp's KV cache in float32: its default F16 cache alone moves logits by ~1e-2


def llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), n_threads=2,
                          logits_all=True, flash_attn=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                          n_gpu_layers=0, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def ik_llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    from ik_llama_cpp import _internals as ik

    model = ik.IkModel(path)
    context = ik.IkContext(model, n_ctx=max(64, len(ids)), n_threads=2, flash_attn=False)
    batch = ik.make_batch_range(ids, logits_last=False)
    for i in range(len(ids)):
        batch.logits[i] = 1
    if context.decode(batch) != 0:
        raise RuntimeError("ik_llama.cpp could not decode the batch")
    rows = [np.ctypeslib.as_array(context.get_logits(i), shape=(model.n_vocab,)).copy() for i in range(len(ids))]
    return np.stack(rows).astype(np.float32)


RUNTIMES = {"llama.cpp": llama_cpp_logits, "ik_llama.cpp": ik_llama_cpp_logits}


def main(argv: list[str]) -> int:
    runtime, path, ids, out = argv
    logits = RUNTIMES[runtime](path, [int(t) for t in ids.split(",")])
    np.save(out, logits, allow_pickle=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
