"""The GGUF tokenizer metadata of a tokenizer of Llama 3's size (128,256 tokens, 280,147 merges), step by step.

    python benchmarks/bench_tokenizer.py [TOKENIZER_FOLDER] [--repeat N]

TOKENIZER_FOLDER defaults to $BITNET_TOKENIZER_DIR (a real tokenizer, e.g. the Llama-3 one 2B4T ships), else the
one make_2b4t.py put into bench-out/2b4t-hf, else one make_tokenizer.py makes into bench-out/llama3-sized-tokenizer
(the same size and layout as Llama 3's, random token strings). Times, best of --repeat in this process: checking and parsing
the files as a reader does (`tokenizer_files.check`), building GGUF's vocabulary from them
(`gguf_tokenizer.vocab_from_files`), and serializing its key/values (what `hf-to-gguf` writes into the header).
Exits 1 when serializing takes more than issue 14's 0.3 s ("GGUF tokenizer metadata written in <= 0.3 s");
building the vocabulary is reported beside it (its checks of the 280k merges against the vocabulary are Python
work the writer overlaps with making the first tensors, the GGUF layout in formats/gguf/writer.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402

FLOOR_S = 0.3
MADE = REPO / "bench-out" / "llama3-sized-tokenizer"


def default_folder() -> Path:
    import make_tokenizer

    real = os.environ.get("BITNET_TOKENIZER_DIR")
    if real:
        return Path(real)
    for folder in (REPO / "bench-out" / "2b4t-hf", MADE):
        if (folder / "tokenizer.json").is_file():
            return folder
    return make_tokenizer.write(MADE)


def main(argv=None) -> int:
    from bitnet_convert.formats import tokenizer_files
    from bitnet_convert.formats.gguf import tokenizer as gguf_tokenizer
    from bitnet_convert.formats.gguf.bulk import BulkGGUFWriter
    from bitnet_core.names import TOKENIZER_FILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=None)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else default_folder()
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    config = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001}

    def check():  # fresh bytes each time: parsed() keeps what it parsed per bytes object
        return tokenizer_files.check({name: bytes(bytearray(data)) for name, data in files.items()},
                                     lambda name: f"{folder}/{name}")

    t_check, _ = harness.best_time(check, args.repeat, warm_up=False)
    tokenizer_files.check(files, lambda name: f"{folder}/{name}")  # parsed once, as a reader leaves them
    t_vocab, vocab = harness.best_time(lambda: gguf_tokenizer.vocab_from_files(files, config, 128256, str(folder)),
                                       args.repeat, warm_up=False)

    def serialize() -> int:
        writer = BulkGGUFWriter(None, "bitnet")
        vocab.add_to(writer)
        return sum(len(writer._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type)) + len(k)
                   for k, v in writer.kv_data[0].items())

    t_kv, size = harness.best_time(serialize, args.repeat, warm_up=False)
    print(f"tokenizer: {folder} ({len(vocab.tokens):,} tokens, {len(vocab.merges):,} merges)")
    print(f"check + parse the files (reader)      {t_check:6.3f} s")
    print(f"build GGUF's vocabulary               {t_vocab:6.3f} s")
    print(f"serialize its key/values ({size / 2**20:.1f} MiB)   {t_kv:6.3f} s")
    print(f"metadata written (serialize)          {t_kv:6.3f} s  (floor {FLOOR_S} s: "
          f"{'pass' if t_kv <= FLOOR_S else 'MISSED'})")
    return 0 if t_kv <= FLOOR_S else 1


if __name__ == "__main__":
    sys.exit(main())
