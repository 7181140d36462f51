"""`bitnet-convert generate`: text from any checkpoint this tool reads, with the packed decode engine.

    gen = Generator.load("./model-hf")                 # packed weights, tokenizer, end-of-sequence ids
    result = gen.generate(gen.encode("User: hi<|eot_id|>Assistant: "), max_new_tokens=32,
                          on_text=lambda s: print(s, end="", flush=True))

The engine (bitnet_model/engine.py) holds projections 2-bit packed and the embedding in its stored dtype, so a
2B4T-sized model needs ~1.2 GB. Prefill runs the prompt right-padded to a power of two (at least 16) and the
cache is sized in steps of CACHE_STEP, so a session compiles a handful of programs, not one per prompt. Each
decode step is one compiled program that samples the next token and writes one cache position in place (the
cache is donated). Sampling: greedy (argmax), or temperature then nucleus (top-p) with a seeded key folded with
the step number, so a seed gives the same tokens every run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import mmap
import os
import time
from collections.abc import Callable, Sequence

from . import registry
from .errors import ConvertError

MIN_PREFILL = 16
CACHE_STEP = 256  # cache slots are allocated in multiples of this: few decode compilations, little waste


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]  # generated tokens, the end-of-sequence token included when one stopped generation
    prefill_s: float  # prompt in, first new token out (compilation included on a first call)
    decode_s: list[float]  # wall time of each later token
    stopped_at_eos: bool

    @property
    def decode_s_per_token(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else float("nan")


def prefill_length(prompt_length: int) -> int:
    return max(MIN_PREFILL, 1 << (prompt_length - 1).bit_length())


def cache_length(prompt_length: int, max_new_tokens: int) -> int:
    need = max(prefill_length(prompt_length), prompt_length + max_new_tokens)
    return -(-need // CACHE_STEP) * CACHE_STEP


def eos_token_ids(config: dict, tokenizer_files: dict[str, bytes]) -> set[int]:
    """End-of-sequence ids from config.json and generation_config.json (2B4T's lists <|eot_id|> there)."""
    ids: set[int] = set()
    sources = [config]
    if "generation_config.json" in tokenizer_files:
        try:
            sources.append(json.loads(tokenizer_files["generation_config.json"]))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    for source in sources:
        value = source.get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int):
                ids.add(item)
    return ids


# --------------------------------------------------------------------------------------------- sampling


def sample(logits, key, temperature, top_p, *, greedy: bool):
    """logits f32 [B, V] -> int32 [B]: argmax, or a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p (the most likely token always stays)."""
    import jax
    import jax.numpy as jnp

    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] most likely first
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    ranked = jnp.where(before < top_p, ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)  # [B] rank
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.cache
def _compiled():
    """The jitted prefill and decode steps (built on first use: importing this module must not import JAX)."""
    import jax

    from bitnet_model import engine

    def first(cfg, opts, weights, token_ids, prompt_length, key, temperature, top_p, *, max_length, greedy):
        logits, cache = engine.prefill(cfg, opts, weights, token_ids, prompt_length, max_length)
        return sample(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy), cache

    def step(cfg, opts, weights, token_ids, cache, key, temperature, top_p, *, greedy):
        logits, cache = engine.decode(cfg, opts, weights, token_ids, cache)
        return sample(logits, jax.random.fold_in(key, cache.length), temperature, top_p, greedy=greedy), cache

    return (
        jax.jit(first, static_argnames=("cfg", "opts", "max_length", "greedy")),
        jax.jit(step, static_argnames=("cfg", "opts", "greedy"), donate_argnames=("cache",)),
    )


# ------------------------------------------------------------------------------------------ the generator


class Generator:
    """A loaded model ready to generate: engine weights, options, tokenizer (or None) and eos ids."""

    def __init__(self, cfg, weights, *, tokenizer=None, eos_ids: set[int] | None = None, opts=None):
        from bitnet_model import engine

        self.cfg = cfg
        self.weights = weights
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids or ())
        self.opts = opts or engine.Options.for_backend()

    def products(self) -> str:
        """Which kernels run the products: "native <level>" (bitnet_model/native) or "XLA (<why not native>)"."""
        import jax

        from bitnet_model import native

        if self.opts.native:
            return f"native {native.level()}"
        why = native.reason() if jax.default_backend() == "cpu" else jax.default_backend()
        return f"XLA ({why})" if why else "XLA"

    @classmethod
    def load(cls, src: str, *, revision: str | None = None) -> Generator:
        """Read SRC (any format) tensor by tensor into the packed engine."""
        from bitnet_model import engine
        from bitnet_model.config import ModelConfig

        ckpt = registry.read_checkpoint(src, revision=revision)
        source = ckpt.provenance.get("path") or ckpt.provenance.get("source")
        source = source if source and os.path.exists(source) else None  # a hub id: its files are in the cache

        def release():
            release_mapped_pages(source)

        weights = engine.weights_from_checkpoint(ckpt, release=release)
        cfg = ModelConfig.from_hf(ckpt.config)
        tokenizer = load_tokenizer(ckpt.tokenizer_files)
        eos = eos_token_ids(ckpt.config, ckpt.tokenizer_files)
        del ckpt
        release()
        return cls(cfg, weights, tokenizer=tokenizer, eos_ids=eos)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConvertError("this checkpoint has no tokenizer.json: give the prompt as --prompt-ids")
        return list(self.tokenizer.encode(text).ids)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: Callable[[int], None] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Continue one prompt by up to `max_new_tokens` tokens, stopping after an end-of-sequence token.

        on_token gets each new id as soon as it exists; on_text gets the new text (needs a tokenizer)."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        prompt = [int(t) for t in prompt_ids]
        _check_request(prompt, max_new_tokens, greedy, temperature, top_p, self.cfg.vocab_size)
        first, step = _compiled()
        padded = np.zeros((1, prefill_length(len(prompt))), np.int32)
        padded[0, : len(prompt)] = prompt
        key = jax.random.key(seed)
        temperature_, top_p_ = jnp.float32(temperature), jnp.float32(top_p)
        streamer = _TextStream(self.tokenizer, on_text) if on_text is not None else None
        new: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        token, cache = first(self.cfg, self.opts, self.weights, padded, np.int32(len(prompt)), key, temperature_,
                             top_p_, max_length=cache_length(len(prompt), max_new_tokens), greedy=greedy)
        prefill_s = None
        while True:
            value = int(np.asarray(token)[0])  # waits for the step
            now = time.perf_counter()
            if prefill_s is None:
                prefill_s = now - start
            else:
                times.append(now - start)
            start = now
            new.append(value)
            if on_token is not None:
                on_token(value)
            if streamer is not None:
                streamer.add(value)
            if value in self.eos_ids or len(new) == max_new_tokens:
                break
            token, cache = step(self.cfg, self.opts, self.weights, token, cache, key, temperature_, top_p_,
                                greedy=greedy)
        if streamer is not None:
            streamer.flush()
        return GenerationResult(prompt, new, prefill_s, times, new[-1] in self.eos_ids)


def _check_request(prompt, max_new_tokens, greedy, temperature, top_p, vocab_size) -> None:
    if not prompt:
        raise ConvertError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ConvertError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if max_new_tokens < 1:
        raise ConvertError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ConvertError(f"sampling needs temperature > 0 and 0 < top-p <= 1 (got {temperature}, {top_p})")


class _TextStream:
    """Turns ids into text as they come: decodes the whole continuation and emits what is new, holding back a
    tail that ends in an incomplete UTF-8 sequence (byte-level BPE splits characters across tokens)."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def flush(self) -> None:
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.emit(text[self.shown :])
            self.shown = len(text)


def load_tokenizer(tokenizer_files: dict[str, bytes]):
    """A `tokenizers.Tokenizer` from the checkpoint's tokenizer.json, or None when it has none."""
    data = tokenizer_files.get("tokenizer.json")
    if data is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise ConvertError(f"tokenizer.json cannot be read: {exc}") from None


# --------------------------------------------------------------------------- memory-mapped source pages

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def release_mapped_pages(path: str | os.PathLike | None = None) -> None:
    """Drop from this process the resident pages of read-only shared file mappings (those under `path`, or all).

    Readers memory-map their sources, and every page a loader touched stays in the process's resident set
    (and its peak RSS) until the mapping closes: 1.2 GB for 2B4T, on top of the 1.2 GB of packed weights.
    The pages are clean file pages, so dropping them (madvise MADV_DONTNEED) loses nothing: a later read
    faults them back in from the page cache. Readers map data read-only and shared (np.memmap mode "r");
    shared libraries are private mappings and are left alone. Linux only; elsewhere it does nothing.
    """
    root = os.path.realpath(os.fspath(path)) if path is not None else None
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1] or not parts[1].endswith("s"):
            continue  # writable mappings may hold data that exists nowhere else; private ones are code
        name = parts[5].strip()
        if root is None or name == root or name.startswith(root.rstrip("/") + "/"):
            begin, end = (int(x, 16) for x in parts[0].split("-"))
            madvise(begin, end - begin, _MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------- command


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ConvertError(f"--prompt-ids must be integers separated by spaces, not {text!r}") from None
    if not ids:
        raise ConvertError("--prompt-ids is empty")
    return ids


def run_generate(src: str, *, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, greedy: bool,
                 temperature: float | None, top_p: float | None, seed: int, revision: str | None,
                 write: Callable[[str], None], stats: Callable[[str], None] | None = None) -> GenerationResult:
    """The `generate` command: stream the continuation through `write` (text, or ids when SRC has no tokenizer)."""
    if (prompt is None) == (prompt_ids is None):
        raise ConvertError("give exactly one of --prompt and --prompt-ids")
    if greedy and (temperature is not None or top_p is not None):
        raise ConvertError("--greedy cannot be combined with --temperature or --top-p")
    sampling = temperature is not None or top_p is not None
    gen = Generator.load(src, revision=revision)
    ids = gen.encode(prompt) if prompt is not None else parse_prompt_ids(prompt_ids)
    if gen.tokenizer is not None:
        callbacks = {"on_text": write}
    else:
        callbacks = {"on_token": lambda token: write(f"{token} ")}
    result = gen.generate(ids, max_new_tokens, greedy=not sampling, temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, seed=seed, **callbacks)
    write("\n")
    if stats is not None:
        stats(f"prompt {len(ids)} tokens: {result.prefill_s * 1e3:.0f} ms to the first new token; "
              f"{len(result.decode_s)} more at {result.decode_s_per_token * 1e3:.0f} ms/token; "
              f"products: {gen.products()}")
    return result
