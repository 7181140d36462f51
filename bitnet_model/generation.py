"""Generation: the engine's prefill and decode steps with sampling fused in, a Generator that streams tokens and
text, and greedy continuation of a reference model.

    gen = Generator.from_checkpoint(ckpt, tokenizer=tok, eos_ids={128009})
    result = gen.generate(gen.encode("User: hi<|eot_id|>Assistant: "), max_new_tokens=32,
                          on_text=lambda s: print(s, end="", flush=True))

The engine (engine.py) holds projections 2-bit packed and the embedding in its stored dtype, so a 2B4T-sized
model needs ~1.2 GB. Prefill runs the prompt right-padded to a power of two (at least MIN_PREFILL) and the cache
is sized in steps of CACHE_STEP, so a session compiles a handful of programs, not one per prompt. Each decode
step is one compiled program that samples the next token and writes one cache position in place (the cache is
donated). Sampling: greedy (argmax), or temperature then nucleus (top-p) with a seeded key folded with the step
number, so a seed gives the same tokens every run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_core import validate
from bitnet_core.config import ModelConfig
from bitnet_core.errors import ConvertError
from bitnet_model import engine, native

log = logging.getLogger("bitnet_model")
MIN_PREFILL = 16
SEED_MAX = 2**32 - 1
CACHE_STEP = 256  # cache slots are allocated in multiples of this: few decode compilations, little waste


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]  # generated tokens, the end-of-sequence token included when one stopped generation
    prefill_s: float  # prompt in, first new token out (compilation excluded: compile_s)
    decode_s: list[float]  # wall time of each later token (compilation excluded)
    stopped_at_eos: bool
    # Tracing and compiling this call's prefill and decode programs (XLA's compilation, or loading it from the
    # persistent compilation cache), before the prompt goes in; 0 when the Generator had them already.
    compile_s: float = 0.0

    @property
    def decode_s_per_token(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else float("nan")

    @property
    def decode_median_s(self) -> float:
        """Steady-state decode: the median step (NaN without one)."""
        return statistics.median(self.decode_s) if self.decode_s else float("nan")


def prefill_length(prompt_length: int) -> int:
    return max(MIN_PREFILL, 1 << (prompt_length - 1).bit_length())


def cache_length(prompt_length: int, max_new_tokens: int) -> int:
    need = max(prefill_length(prompt_length), prompt_length + max_new_tokens)
    return -(-need // CACHE_STEP) * CACHE_STEP


# --------------------------------------------------------------------------------------------- sampling


def sample(logits, key, temperature, top_p, *, greedy: bool):
    """logits f32 [B, V] -> int32 [B]: argmax, or a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p (the most likely token always stays)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Scaled from the largest logit down: the limit T -> 0 (a temperature so small that every other logit's
    # distance over it overflows to -inf) is then a draw among the largest logits, i.e. greedy, never NaN.
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] most likely first
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    ranked = jnp.where(before < top_p, ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)  # [B] rank
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.cache
def _jitted():
    """The jitted prefill and decode steps, each with its sampling fused in (compiled ahead of their first call
    by Generator._programs)."""
    def first(cfg, opts, weights, token_ids, prompt_length, key, temperature, top_p, *, max_length, greedy):
        if greedy:  # as step: through the greedy screen where the weights have one
            return engine.prefill_greedy(cfg, opts, weights, token_ids, prompt_length, max_length)
        logits, cache = engine.prefill(cfg, opts, weights, token_ids, prompt_length, max_length)
        return sample(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy), cache

    def step(cfg, opts, weights, token_ids, cache, key, temperature, top_p, *, greedy):
        if greedy:  # the argmax alone: through the greedy screen where the weights have one
            return engine.decode_greedy(cfg, opts, weights, token_ids, cache)
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
        self.cfg = cfg
        self.weights = weights
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids or ())
        self.opts = opts or engine.Options.for_backend()
        self._compiled: dict[tuple, tuple] = {}  # (opts, padded prompt, cache length, greedy) -> programs

    def _programs(self, padded, prompt_length, key, temperature, top_p, max_length: int, greedy: bool, decodes: bool):
        """The compiled prefill program and, when `decodes`, the decode step's, for this request's shapes, and
        whether one was compiled now. Compiled ahead of their first call (so compilation is timed apart from
        prefill and decode), once per Generator; with the persistent compilation cache on (compile_cache.enable),
        XLA's part comes from disk."""
        slot = (self.opts, padded.shape, max_length, greedy)
        have = self._compiled.get(slot, (None, None))
        if have[0] is not None and (have[1] is not None or not decodes):
            return (*have, False)
        first, step = _jitted()
        prefill = have[0] or first.lower(self.cfg, self.opts, self.weights, padded, prompt_length, key, temperature,
                                         top_p, max_length=max_length, greedy=greedy).compile()
        decode = None
        if decodes:
            token, cache = prefill.out_info  # the shapes the decode step takes
            decode = step.lower(self.cfg, self.opts, self.weights, token, cache, key, temperature, top_p,
                                greedy=greedy).compile()
        self._compiled[slot] = (prefill, decode)
        return prefill, decode, True

    def products(self) -> str:
        """Which kernels run the products: "native <level>" (bitnet_model/native) or "XLA (<why not native>)"."""
        head = "; int8 head (lossy)" if self.weights.embed_scale is not None else ""
        if self.weights.screen_codes is not None and self.opts.native:  # the screen is a native kernel
            head += "; greedy screen"
        if self.opts.native:
            return f"native {native.level()}{head}"
        why = native.reason() if jax.default_backend() == "cpu" else jax.default_backend()
        return (f"XLA ({why})" if why else "XLA") + head

    @classmethod
    def from_checkpoint(cls, ckpt, *, tokenizer=None, eos_ids: set[int] | None = None, release=None,
                        head: str = "stored", screen: bool = False, in_place: bool = False) -> Generator:
        """Engine weights read from a Checkpoint tensor by tensor (`release`, `head`, `screen` and `in_place` as
        in engine.weights_from_checkpoint; `in_place` only where the native kernels run)."""
        in_place = in_place and engine.Options.for_backend().native
        weights = engine.weights_from_checkpoint(ckpt, release=release, head=head, screen=screen, in_place=in_place)
        return cls(ModelConfig.from_hf(ckpt.config), weights, tokenizer=tokenizer, eos_ids=eos_ids)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConvertError("this checkpoint has no tokenizer.json: give the prompt as token ids")
        return list(self.tokenizer.encode(validate.unicode_text(text, "the prompt")).ids)

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
        prompt = [int(t) for t in prompt_ids]
        _check_request(prompt, max_new_tokens, greedy, temperature, top_p, seed, self.cfg.vocab_size)
        max_new_tokens = within_context(len(prompt), max_new_tokens, self.cfg.max_position_embeddings)
        padded = np.zeros((1, prefill_length(len(prompt))), np.int32)
        padded[0, : len(prompt)] = prompt
        key = jax.random.key(seed)
        with np.errstate(over="ignore"):  # a temperature beyond float32 is +inf: its limit, uniform sampling
            temperature_, top_p_ = np.float32(temperature), np.float32(top_p)
        # A temperature below float32's smallest normal number is its limit, greedy: XLA flushes subnormals to
        # zero (1e-45 would divide by 0), and any two logits further apart than ~1e-36 differ by more than 1e2
        # once divided by it, so the draw is the largest logit anyway.
        greedy = greedy or temperature_ < np.finfo(np.float32).tiny
        length = np.int32(len(prompt))
        streamer = _TextStream(self.tokenizer, on_text) if on_text is not None else None
        new: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        first, step, compiled = self._programs(padded, length, key, temperature_, top_p_,
                                               cache_length(len(prompt), max_new_tokens), greedy, max_new_tokens > 1)
        compile_s = time.perf_counter() - start if compiled else 0.0
        start = time.perf_counter()
        token, cache = first(self.weights, padded, length, key, temperature_, top_p_)
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
            token, cache = step(self.weights, token, cache, key, temperature_, top_p_)
        if streamer is not None:
            streamer.flush()
        return GenerationResult(prompt, new, prefill_s, times, new[-1] in self.eos_ids, compile_s)


def within_context(prompt_length: int, max_new_tokens: int, context: int) -> int:
    """`max_new_tokens`, capped so that prompt and continuation fit the model's context (max_position_embeddings),
    with a warning saying so: the KV cache is sized from it (10^7 tokens once asked for 24 GB)."""
    if prompt_length >= context:
        raise ConvertError(f"the prompt has {prompt_length} tokens, but the model's context "
                           f"(max_position_embeddings) holds {context}: no room for a new token")
    room = context - prompt_length
    if max_new_tokens > room:
        log.warning("--max-new-tokens %d capped at %d: the model's context (max_position_embeddings) is %d "
                    "tokens and the prompt takes %d", max_new_tokens, room, context, prompt_length)
        return room
    return max_new_tokens


def _check_request(prompt, max_new_tokens, greedy, temperature, top_p, seed, vocab_size) -> None:
    if not prompt:
        raise ConvertError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ConvertError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if max_new_tokens < 1:
        raise ConvertError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ConvertError(f"sampling needs temperature > 0 and 0 < top-p <= 1 (got {temperature}, {top_p})")
    if not 0 <= seed <= SEED_MAX:  # jax.random.key keeps 32 bits: 2^32 would draw what 0 draws, 2^64 overflow
        digits = str(seed)
        shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits.lstrip('-'))} digits)"
        raise ConvertError(f"--seed must be an integer from 0 to {SEED_MAX} (the sampler's key holds 32 bits), "
                           f"not {shown}")


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


def greedy_generate(model, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None) -> np.ndarray:
    """Greedy continuation of a reference model's prompts int [B, T] (all the same length), run by the engine over
    the model's own packed leaves. Returns int32 [B, T + n] with n <= max_new_tokens: generation stops early once
    every row has produced `eos_token_id` (later tokens of finished rows are eos)."""
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    batch, length = prompt.shape
    cfg, weights = model.config, engine.weights_from_model(model)
    opts = engine.Options.for_backend()
    tokens = np.zeros((batch, prefill_length(length)), np.int32)
    tokens[:, :length] = prompt
    logits, cache = engine.prefill(cfg, opts, weights, jnp.asarray(tokens), jnp.int32(length),
                                   cache_length(length, max_new_tokens))
    out = [prompt]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        next_ids = np.asarray(jnp.argmax(logits, axis=-1), np.int32)  # [B]
        if eos_token_id is not None:
            next_ids = np.where(done, eos_token_id, next_ids)
            done |= next_ids == eos_token_id
        out.append(next_ids[:, None])
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = engine.decode_step(cfg, opts, weights, jnp.asarray(next_ids), cache)
    return np.concatenate(out, axis=1)
