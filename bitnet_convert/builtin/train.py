"""Train the built-in BitNet from nothing, quantization-aware, and write what the package ships.

    python -m bitnet_convert.builtin.train                 # the full run: writes bitnet_convert/builtin/model,
                                                           # its training_log.json and docs/builtin-loss.png
    python -m bitnet_convert.builtin.train --steps 20 OUT  # a short run elsewhere, to try things

Everything is seeded and runs on the CPU: the text (corpus.py), the tokenizer trained on it, the initial
weights, the order of the batches. On one machine and one JAX version (the shipped weights: JAX 0.10.2, jaxlib
0.10.2, flax 0.12.8, optax 0.2.8, tokenizers 0.23.3, on 2 cores of an AMD EPYC) the run reproduces the shipped
weights bit for bit; the log records the JAX version, the hash of the masters after the first PREFIX_STEPS steps (a
test repeats those steps) and the hash of the shipped weights.

The model trains with float32 masters, ternarized in every forward with a straight-through estimator
(bitnet_model.training), the activations quantized per token to int8 as at inference. The shipped form is
the exported inference model with the embedding and norms in bf16 and each multiplier rounded to bf16, as
2B4T stores them (HF `autobitlinear`): the file is exactly the model, nothing rounded on the way out.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from bitnet_convert.builtin import LOG, MODEL_DIR, corpus

SEED = 0
VOCAB_SIZE = 1024
# 2B4T's layout at the smallest widths every runtime accepts: ik_llama.cpp's IQ2_BN rows of >= 512 values,
# TQ blocks of 256, I2_S blocks of 128; GQA 4:1 as 2B4T (20:5).
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, hidden_act="silu")
CONTEXT = 256
TRAIN_DOCUMENTS = 6000
EVAL_DOCUMENTS = 200
BATCH, WINDOW = 16, 64  # sequences of WINDOW + 1 tokens: WINDOW predictions each
STEPS = 400
PEAK_LR, WARMUP = 4e-3, 40
EVAL_EVERY = 50
EVAL_BATCH = 64  # held-out windows per forward
PREFIX_STEPS = 3  # the reproduction test repeats these
PLOT = Path(__file__).resolve().parents[2] / "docs" / "builtin-loss.png"


def tokenizer_files() -> dict[str, bytes]:
    from bitnet_convert.tiny import bpe_tokenizer_files

    return bpe_tokenizer_files(corpus.documents(SEED, TRAIN_DOCUMENTS), VOCAB_SIZE)


def model_config(tokenizer: dict[str, bytes]) -> dict:
    from bitnet_convert.tiny import tiny_config

    vocab = json.loads(tokenizer["tokenizer.json"])
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config = tiny_config(VOCAB_SIZE, **SHAPE)
    config.update(max_position_embeddings=CONTEXT, head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
                  bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
    return config


def token_stream(tokenizer: dict[str, bytes], documents: list[str]) -> np.ndarray:
    """Every document as BOS + its tokens, one after another (int32)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer["tokenizer.json"].decode())
    return np.concatenate([np.asarray(e.ids, np.int32) for e in tok.encode_batch(documents)])


def batches(stream: np.ndarray, bos_id: int, seed: int):
    """Windows of WINDOW + 1 tokens from seeded random document starts, BATCH at a time, forever: every
    sentence is seen with the words before it (a count with its "to N"), and at the positions a prompt has."""
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(stream[: len(stream) - WINDOW - 1] == bos_id)
    while True:
        yield np.stack([stream[s : s + WINDOW + 1] for s in rng.choice(starts, size=BATCH)])


def eval_windows(stream: np.ndarray, bos_id: int) -> np.ndarray:
    """The held-out text as the model is trained and prompted: WINDOW + 1 tokens from each document start."""
    starts = np.flatnonzero(stream[: len(stream) - WINDOW - 1] == bos_id)
    return np.stack([stream[s : s + WINDOW + 1] for s in starts])


def unigram_loss(train: np.ndarray, windows: np.ndarray) -> float:
    """Cross-entropy (nats) of the tokens the held-out windows predict under the training text's token
    frequencies (add-one)."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    return float(-np.mean(np.log(counts / counts.sum())[windows[:, 1:]]))


def params_hash(model) -> str:
    """sha256 of every parameter's float32 bytes in state order: two runs agree bit for bit or not at all."""
    from flax import nnx

    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: kv[0]):
        digest.update(".".join(map(str, path)).encode())
        digest.update(np.ascontiguousarray(np.asarray(var.get_value(), np.float32)).tobytes())
    return digest.hexdigest()


def parameter_count(model) -> int:
    from flax import nnx

    return int(sum(np.size(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))))


def new_model(config: dict):
    from flax import nnx

    from bitnet_core.config import ModelConfig
    from bitnet_model.modeling import BitNetForCausalLM

    model = BitNetForCausalLM(ModelConfig.from_hf(config), mode="training", rngs=nnx.Rngs(SEED))
    model.hf_config_json = json.dumps(config, sort_keys=True)
    return model


def optimizer_for(model, steps: int):
    import optax
    from flax import nnx

    schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, WARMUP, max(steps, WARMUP + 1), PEAK_LR / 10)
    return nnx.Optimizer(model, optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01), wrt=nnx.Param)


def train(config: dict, stream: np.ndarray, steps: int, on_step=None, schedule_steps: int | None = None):
    """The training model after `steps` steps of a schedule for `schedule_steps` (default: `steps`);
    `on_step(step, loss, model)` after each one."""
    from bitnet_model.training import train_step_jit

    model = new_model(config)
    optimizer = optimizer_for(model, schedule_steps or steps)
    batch = batches(stream, config["bos_token_id"], SEED)
    for step in range(1, steps + 1):
        loss = float(train_step_jit(model, optimizer, next(batch)))
        if on_step is not None:
            on_step(step, loss, model)
    return model


def prefix_hash(steps: int = PREFIX_STEPS) -> str:
    """The masters' hash after the first `steps` steps of the full run (its learning-rate schedule, its batches)."""
    tokenizer = tokenizer_files()
    stream = token_stream(tokenizer, corpus.documents(SEED, TRAIN_DOCUMENTS))
    return params_hash(train(model_config(tokenizer), stream, steps, schedule_steps=STEPS))


def shipped_checkpoint(model, tokenizer: dict[str, bytes], config: dict, source: str):
    """The trained model in the form the package ships: packed codes with bf16-exact multipliers, bf16
    embedding and norms (2B4T's dtypes)."""
    import ml_dtypes

    from bitnet_core.checkpoint import Checkpoint, Ternary
    from bitnet_model.params import checkpoint_from_model
    from bitnet_model.training import export_inference

    exported = checkpoint_from_model(export_inference(model), config=config, keep_stored_dtypes=False)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    arrays = {}
    for entry in exported:
        value = entry.load()
        if isinstance(value, Ternary):
            arrays[entry.name] = Ternary(value.codes, np.float32(np.float32(value.multiplier).astype(bf16)))
        else:
            arrays[entry.name] = np.asarray(value, np.float32).astype(bf16)
    return Checkpoint.from_arrays(config, arrays, tokenizer_files=tokenizer,
                                  provenance={"format": "builtin", "source": source})


def held_out_loss(ckpt, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats) of a checkpoint's inference model on the held-out windows."""
    import optax

    from bitnet_model.params import logits, model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    losses = [optax.softmax_cross_entropy_with_integer_labels(logits(model, w[:, :-1]), w[:, 1:])
              for w in np.array_split(windows, -(-len(windows) // EVAL_BATCH))]
    return float(np.mean(np.concatenate([np.asarray(x).reshape(-1) for x in losses])))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plot(log: dict, path: Path) -> bool:
    """The loss curve as a PNG (matplotlib, the `dev` extra); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.arange(1, len(log["train_loss"]) + 1)
    ax.plot(steps, log["train_loss"], lw=0.8, label="training loss (batch)")
    ax.plot([e["step"] for e in log["eval"]], [e["held_out_loss"] for e in log["eval"]], "o-", ms=3,
            label="held-out loss (inference model)")
    ax.axhline(log["unigram_loss"], color="gray", ls="--", lw=0.8, label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"built-in BitNet: {log['parameters']:,} parameters, {log['steps']} steps, JAX {log['jax']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the picture depends on the numbers only
    plt.close(fig)
    return True


def run(out: Path, steps: int = STEPS, log_path: Path = LOG, plot_path: Path | None = PLOT) -> dict:
    import jax

    from bitnet_convert import api

    started = time.perf_counter()
    tokenizer = tokenizer_files()
    config = model_config(tokenizer)
    train_text = token_stream(tokenizer, corpus.documents(SEED, TRAIN_DOCUMENTS))
    held_out = token_stream(tokenizer, corpus.documents(SEED + 1, EVAL_DOCUMENTS, held_out=True))
    windows = eval_windows(held_out, config["bos_token_id"])
    source = f"bitnet_convert.builtin.train seed={SEED} steps={steps}"
    log: dict = {"jax": jax.__version__, "seed": SEED, "steps": steps, "batch": BATCH, "window": WINDOW,
                 "peak_lr": PEAK_LR, "config": config, "train_tokens": int(len(train_text)),
                 "held_out_tokens": int(windows.shape[0] * WINDOW), "unigram_loss": unigram_loss(train_text, windows),
                 "train_loss": [], "eval": []}

    def on_step(step, loss, model):
        log["train_loss"].append(loss)
        if step == PREFIX_STEPS:
            log["prefix_steps"], log["prefix_params_sha256"] = PREFIX_STEPS, params_hash(model)
        if step % EVAL_EVERY == 0 or step == steps:
            ckpt = shipped_checkpoint(model, tokenizer, config, source)
            log["eval"].append({"step": step, "held_out_loss": held_out_loss(ckpt, windows)})
            print(f"step {step:4d}  loss {loss:.3f}  held-out {log['eval'][-1]['held_out_loss']:.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    model = train(config, train_text, steps, on_step)
    log["parameters"] = parameter_count(model)
    log["params_sha256"] = params_hash(model)
    api.write(shipped_checkpoint(model, tokenizer, config, source), out, format="hf", force=True)
    log["held_out_loss"] = log["eval"][-1]["held_out_loss"]
    log["shipped_sha256"] = file_sha256(out / "model.safetensors")
    log["seconds"] = round(time.perf_counter() - started, 1)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    if plot_path is not None and not plot(log, plot_path):
        print("warning: matplotlib is not installed (pip install '.[dev]'): no loss curve", file=sys.stderr)
    return log


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bitnet_convert.builtin.train", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=MODEL_DIR,
                        help="HF folder to write (default: the package's)")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    if args.out.resolve() == MODEL_DIR and args.steps != STEPS:
        parser.error(f"a run of other than {STEPS} steps needs an OUT folder (it would replace the shipped model)")
    full = args.out.resolve() == MODEL_DIR and args.steps == STEPS
    if full:
        log = run(args.out, args.steps)
    else:
        log = run(args.out, args.steps, args.out.with_name(args.out.name + ".training_log.json"), None)
    print(f"{log['steps']} steps in {log['seconds']} s (JAX {log['jax']}): held-out loss {log['held_out_loss']:.3f} "
          f"nats/token against {log['unigram_loss']:.3f} for the unigram baseline; weights sha256 "
          f"{log['shipped_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
