"""A byte-level BPE tokenizer of the real Llama-3 tokenizer's size, made from nothing but a seed.

    python benchmarks/make_tokenizer.py OUT_DIR [--seed N]

2B4T ships Llama 3's tokenizer: 128,000 byte-level BPE tokens + 256 special tokens (ids 128,000-128,255),
280,147 merges and Llama 3's split regex. A conversion to GGUF carries all of it into the file's metadata, and at
this size that is a real part of the cost (bench_tokenizer.py, run_all.py). The real file is not ours to ship, so
the benchmarks make one of the same size and layout here: its token strings are random, not learned from text,
and it encodes text into other ids than Llama 3's, which no benchmark depends on (their prompts are token ids).
A real tokenizer folder can be given instead with $BITNET_TOKENIZER_DIR.

How: the 256 byte symbols of GPT-2's byte-level alphabet, in its order, are ids 0-255. Longer tokens are built
length by length over 68 symbols (space, newline, letters, digits, punctuation): a token of length L is a token
of length L-1 with one symbol appended whose last L-1 symbols are a token too, so every substring of a token is
a token (per-length counts shaped like Llama 3's, mean length ~6 symbols). Every split of a token into two then
names two tokens: each token gets its merge (all but the last symbol, the last symbol), and 152,403 more splits,
drawn at random, make up Llama 3's 280,147 merges. Same seed, same files (about 2 s on one core).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bitnet_convert.formats.gguf.tokenizer import LLAMA3_REGEX  # noqa: E402

TOKENS = 128_000  # byte-level BPE tokens (ids 0 .. 127,999)
MERGES = 280_147
SYMBOLS = "Ġ" + "etaoinshrdlcumwfgypbvkjxqz" + "ETAOINSHRDLCUMWFGYPBVKJXQZ" + "0123456789" + "Ċ.,'-"  # Ġ: space, Ċ: \n
# Tokens per length from 2 symbols up; the last length takes what is left
PER_LENGTH = (4600, 16000, 20000, 19000, 17000, 14000, 11000, 8500, 6500, 4500, 3000, 2000, 1300, 800)
BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>")
FILES = ("tokenizer.json", "tokenizer_config.json")


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet in id order: printable Latin-1 bytes stand for themselves, the other bytes
    for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def special_tokens() -> list[str]:
    """Llama 3's 256 special tokens, in id order from 128,000."""
    reserved = iter(f"<|reserved_special_token_{i}|>" for i in range(251))
    named = {0: BOS, 1: EOT_TEXT, 6: START_HEADER, 7: END_HEADER, 9: EOT}
    return [named[i] if i in named else next(reserved) for i in range(256)]


def longer_tokens(rng: random.Random, count: int) -> list[str]:
    """`count` distinct strings of 2+ symbols whose every substring is among them or is one symbol."""
    pairs = [a + b for a in SYMBOLS for b in SYMBOLS]
    rng.shuffle(pairs)
    levels = [pairs[: PER_LENGTH[0]]]
    made = len(levels[0])
    for length in range(3, 64):
        if made == count:
            break
        endings = collections.defaultdict(list)  # a token less its last symbol -> the symbols that end it
        for token in levels[-1]:
            endings[token[:-1]].append(token[-1])
        candidates = [token + last for token in levels[-1] for last in endings.get(token[1:], ())]
        rng.shuffle(candidates)
        want = PER_LENGTH[length - 2] if length - 2 < len(PER_LENGTH) else count
        levels.append(candidates[: min(want, count - made)])
        made += len(levels[-1])
    if made != count:
        raise AssertionError(f"made {made} tokens, not {count}")
    return [token for level in levels for token in level]


def merges_of(rng: random.Random, tokens: list[str], count: int) -> list[tuple[str, str]]:
    """One merge per token (all but its last symbol + its last symbol) and random other splits up to `count`,
    in the order of the tokens they make."""
    others = [(i, cut) for i, token in enumerate(tokens) for cut in range(1, len(token) - 1)]
    chosen = sorted(rng.sample(others, count - len(tokens)))
    extra = collections.defaultdict(list)
    for i, cut in chosen:
        extra[i].append(cut)
    merges = []
    for i, token in enumerate(tokens):
        merges += [(token[:cut], token[cut:]) for cut in [len(token) - 1, *extra[i]]]
    return merges


def tokenizer_files(seed: int = 0) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json of the Llama-3-sized tokenizer for `seed`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    rng = random.Random(seed)
    symbols = byte_symbols()
    tokens = longer_tokens(rng, TOKENS - len(symbols))
    vocab = {token: i for i, token in enumerate(symbols + tokens)}
    tok = Tokenizer(models.BPE(vocab, merges_of(rng, tokens, MERGES), ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens()])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, TOKENS)])
    config = {  # 2B4T's conventions: BOS added, turns end with <|eot_id|>, `Role: content<|eot_id|>`
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT, "add_bos_token": True,
        "add_eos_token": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
                         "{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: "
                         "{% endif %}",
    }
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def write(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(seed).items():
        (out / name).write_bytes(data)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write(args.out_dir, args.seed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
