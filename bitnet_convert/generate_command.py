"""The application's `bitnet-convert generate` command over the engine: text from any checkpoint this tool reads,
with the model's Generator (bitnet_model/generation.py holds sampling and the decode loop): the source read tensor by tensor, its tokenizer and end-of-sequence ids, and the
pages of the memory-mapped source released as the weights are packed.

    gen = load_generator("./model-hf")
    result = gen.generate(gen.encode("User: hi<|eot_id|>Assistant: "), max_new_tokens=32)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bitnet_convert.formats import registry
from bitnet_convert.formats.tokenizer_files import clear_cache as forget_parsed_tokenizer_files
from bitnet_core import pages
from bitnet_core.checkpoint import Checkpoint, PackedLoader, RowsLoader, TensorEntry
from bitnet_core.errors import ConvertError

if TYPE_CHECKING:
    from bitnet_model.generation import GenerationResult

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


def load_generator(src: str, *, revision: str | None = None, head: str = "stored", screen: bool | None = None,
                   greedy: bool = True):
    """Read SRC (any format) tensor by tensor into the packed engine, with its tokenizer and eos ids; `head`
    "int8" holds the embedding / output table as int8 rows (engine.HEAD_INT8: faster decode, lossy); `screen`
    adds the greedy screen (engine.with_screen: faster greedy decode, the same tokens), None: wherever decoding
    is `greedy`, the head stored and the native kernels run. Where they run, a stored bf16 or float32 table is
    read in place from the source's memory map (bitnet_model/tables.py): with the screen, greedy decoding then
    holds the screen and not the table. Turns on the persistent compilation cache first
    (bitnet_model/compile_cache.py): a later run loads what this one compiles."""
    from bitnet_model import compile_cache, engine
    from bitnet_model.generation import Generator

    if screen and head != "stored":
        raise ConvertError("--greedy-screen screens the stored head; the int8 head has nothing to screen")
    native = engine.Options.for_backend().native
    if screen is None:
        screen = greedy and head == "stored" and native
    compile_cache.enable()  # before anything compiles: JAX decides once per process

    ckpt = registry.read_checkpoint(src, revision=revision)
    forget_parsed_tokenizer_files()  # the checked tokenizer.json, parsed (~100 MB for Llama 3's): not needed now
    source = ckpt.provenance.get("path") or ckpt.provenance.get("source")
    source = source if source and os.path.exists(source) else None  # a hub id: its files are in the cache

    mapped = [True]  # readers that map their source (GGUF's) do it when they open it

    def release():  # after every tensor: scanning /proc/self/maps each time cost seconds where nothing was mapped
        if mapped[0]:
            mapped[0] = release_mapped_pages(source)

    tokenizer = LazyTokenizer(ckpt.tokenizer_files["tokenizer.json"], src) if "tokenizer.json" in \
        ckpt.tokenizer_files else None
    eos = eos_token_ids(ckpt.config, ckpt.tokenizer_files)
    in_place = native and screen  # only the screen reads few enough table rows to read them from the file
    # the int8 head reads its tables by rows, the screen in place: neither wants them read ahead whole
    own_loads = engine.TABLES if head == engine.HEAD_INT8 or in_place else ()
    with ReadAhead(ckpt, skip=own_loads) as ahead:
        gen = Generator.from_checkpoint(ahead.checkpoint, tokenizer=tokenizer, eos_ids=eos, release=release,
                                        head=head, screen=screen, in_place=in_place)
    del ckpt
    release()
    return gen


class ReadAhead:
    """The checkpoint with each tensor's stored bytes read one tensor ahead, on a thread of its own, while the
    engine packs the one before (reads release the GIL, and so do the codecs): the load's reading and packing
    overlap instead of taking turns. Each tensor is read as the engine takes it (the packed bytes of a
    projection that offers them, else its values), in the checkpoint's order, and at most DEPTH are held;
    a tensor taken out of order is read then and there. `skip`: tensors left to their own loaders."""

    DEPTH = 2  # the one being packed and the next: one tensor more in memory than without

    def __init__(self, ckpt: Checkpoint, skip=()):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "bitnet-convert-read-ahead")
        self._order = [entry for entry in ckpt if entry.name not in skip]
        self._ahead: dict[str, concurrent.futures.Future] = {}
        self._next = 0
        wrapped = {name: entry if name in skip else self._wrap(entry) for name, entry in ckpt.tensors.items()}
        self.checkpoint = dataclasses.replace(ckpt, tensors=wrapped)
        self._fill()

    @staticmethod
    def _read(entry: TensorEntry):
        packed = entry.load_packed
        return packed() if packed is not None and len(entry.shape) == 2 else entry.load()

    def _fill(self) -> None:
        while self._next < len(self._order) and len(self._ahead) < self.DEPTH:
            entry = self._order[self._next]
            self._ahead[entry.name] = self._pool.submit(self._read, entry)
            self._next += 1

    def _take(self, entry: TensorEntry, own: Callable):
        future = self._ahead.pop(entry.name, None)
        self._fill()
        return future.result() if future is not None else own()

    def _wrap(self, entry: TensorEntry) -> TensorEntry:
        packed, rows = entry.load_packed, entry.load_rows
        if packed is not None and len(entry.shape) == 2:
            return dataclasses.replace(entry, load=PackedLoader(entry.load, lambda: self._take(entry, packed)))
        load = lambda: self._take(entry, entry.load)  # noqa: E731
        if rows is None:
            return dataclasses.replace(entry, load=load)
        return dataclasses.replace(entry, load=RowsLoader(load, rows, entry.load_mapped))

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        """Drop what was read and not taken (a load that failed half-way), and end the thread."""
        self._next = len(self._order)
        for future in self._ahead.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._ahead.clear()


class LazyTokenizer:
    """The tokenizer, built on first use: Llama 3's takes ~190 MB in the tokenizers library, which a prompt given
    as ids never needs (the reader has already checked the file)."""

    def __init__(self, data: bytes, where: str):
        self._data, self._where, self._tokenizer = data, where, None

    def __getattr__(self, name: str):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer({"tokenizer.json": self._data}, self._where)
        return getattr(self._tokenizer, name)


def load_tokenizer(tokenizer_files: dict[str, bytes], where: str = "checkpoint"):
    """A `tokenizers.Tokenizer` from the checkpoint's tokenizer.json, or None when it has none (`where`: the
    source, for the message when the tokenizers library refuses the file)."""
    data = tokenizer_files.get("tokenizer.json")
    if data is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConvertError(f"{where}: its tokenizer.json is not one the tokenizers library loads: {first}") from None


# --------------------------------------------------------------------------- memory-mapped source pages


def release_mapped_pages(path: str | os.PathLike | None = None) -> bool:
    """Drop from this process the resident pages of read-only shared file mappings (those under `path`, or all);
    False when there were none.

    Readers memory-map their sources, and every page a loader touched stays in the process's resident set
    (and its peak RSS) until the mapping closes: 1.2 GB for 2B4T, on top of the 1.2 GB of packed weights.
    The pages are clean file pages, so dropping them (bitnet_core.pages) loses nothing: a later read faults
    them back in from the page cache. Readers map data read-only and shared (np.memmap mode "r");
    shared libraries are private mappings and are left alone. Linux only; elsewhere it does nothing.
    """
    root = os.path.realpath(os.fspath(path)) if path is not None else None
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return False
    found = False
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1] or not parts[1].endswith("s"):
            continue  # writable mappings may hold data that exists nowhere else; private ones are code
        name = parts[5].strip()
        if root is None or name == root or name.startswith(root.rstrip("/") + "/"):
            begin, end = (int(x, 16) for x in parts[0].split("-"))
            pages.drop_resident(begin, end)
            found = True
    return found


# ---------------------------------------------------------------------------------------------- command


@dataclasses.dataclass
class GenerateStats:
    """What `generate --stats` reports, each part timed on its own (seconds; as_dict for a JSON report)."""

    imports_s: float  # JAX and the engine's modules
    load_s: float  # the checkpoint read into the engine
    compile_s: float  # the prefill and decode programs compiled, or loaded from the persistent cache
    prompt_tokens: int
    prefill_s: float  # prompt in, first new token out
    new_tokens: int
    decode_median_s: float | None  # steady-state decode: the median step after the first token (None: no step)
    products: str  # which kernels ran the products
    compilation_cache: str | None  # the persistent compilation cache's folder (None: off)
    programs_cached: int  # programs this process loaded from it (the loader's small ones too)
    programs_compiled: int  # and compiled (then written to it)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        decode = (f"{self.new_tokens - 1} more at {self.decode_median_s * 1e3:.1f} ms/token (median)"
                  if self.decode_median_s is not None else "no more")
        cache = (f"{self.programs_cached} programs from the persistent cache, {self.programs_compiled} compiled"
                 if self.compilation_cache else "persistent cache off")
        return (f"imports {self.imports_s:.2f} s; load {self.load_s:.2f} s; compilation {self.compile_s:.2f} s "
                f"({cache}); prompt {self.prompt_tokens} tokens: {self.prefill_s * 1e3:.0f} ms to the first new token; "
                f"{decode}; products: {self.products}")



def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ConvertError(f"--prompt-ids must be integers separated by spaces, not {text!r}") from None
    if not ids:
        raise ConvertError("--prompt-ids is empty")
    return ids


def sampling_request(greedy: bool | None, temperature: float | None, top_p: float | None) -> dict:
    """Generator.generate's sampling arguments from the user's: greedy unless a temperature or top-p is given."""
    sampling = temperature is not None or top_p is not None
    if greedy and sampling:
        raise ConvertError("--greedy cannot be combined with --temperature or --top-p")
    return {"greedy": not sampling, "temperature": 1.0 if temperature is None else temperature,
            "top_p": 1.0 if top_p is None else top_p}


def check_screen(screen: bool | None, sampling: dict) -> None:
    """The greedy screen finds the argmax alone: sampling needs every logit exactly (asked for, it is refused;
    by default, None, sampling goes without it)."""
    if screen and not sampling["greedy"]:
        raise ConvertError("--greedy-screen is for greedy decoding; sampling (--temperature, --top-p) reads every "
                           "logit of the stored head")


def run_generate(src: str, *, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, greedy: bool,
                 temperature: float | None, top_p: float | None, seed: int, revision: str | None,
                 write: Callable[[str], None], stats: Callable[[GenerateStats], None] | None = None,
                 head: str = "stored", screen: bool | None = None) -> GenerationResult:
    """The `generate` command: stream the continuation through `write` (text, or ids when SRC has no tokenizer);
    `stats` gets the timings."""
    if (prompt is None) == (prompt_ids is None):
        raise ConvertError("give exactly one of --prompt and --prompt-ids")
    sampling = sampling_request(greedy, temperature, top_p)
    check_screen(screen, sampling)
    start = time.perf_counter()
    import bitnet_model.generation  # noqa: F401  (JAX: timed apart from the load)

    imported = time.perf_counter()
    gen = load_generator(src, revision=revision, head=head, screen=screen, greedy=sampling["greedy"])
    load_s = time.perf_counter() - imported
    ids = gen.encode(prompt) if prompt is not None else parse_prompt_ids(prompt_ids)
    if gen.tokenizer is not None:
        callbacks = {"on_text": write}
    else:
        callbacks = {"on_token": lambda token: write(f"{token} ")}
    result = gen.generate(ids, max_new_tokens, **sampling, seed=seed, **callbacks)
    write("\n")
    if stats is not None:
        from bitnet_model import compile_cache

        folder = compile_cache.folder()
        stats(GenerateStats(imported - start, load_s, result.compile_s, len(ids), result.prefill_s, len(result.new_ids),
                            result.decode_median_s if result.decode_s else None, gen.products(),
                            str(folder) if folder else None, *compile_cache.programs()))
    return result
