"""One module per on-disk format, each with the same small interface (the spokes of the hub):

    NAME: str                                   # "hf", "flax", "npz", "gguf"
    def detect(path: Path) -> bool              # cheap sniff: is this path in my format?
    def read(path: str, *, revision: str | None = None) -> Checkpoint
        # lazy: tensors load on demand from memory-mapped input; validates names/shapes against the config
        # (bitnet_core.validate) and raises ConvertError naming the file on anything wrong.
    def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True, **options) -> Path
        # streams tensor by tensor through bitnet_convert.fileio.atomic.atomic_path (all or nothing),
        # shows fileio.progress unless quiet, records provenance + content hash (fileio.integrity).
    def stored_tensor_bytes(path) -> integrity.StoredModel
        # what the content hash covers (blake3-model-v4): each tensor's name, stored dtype, shape and bytes in
        # file order, the config documents and tokenizer files; iterating it gives (name, bytes) pairs.
    def recorded_provenance(path) -> dict | None  # what the writer recorded (None for foreign files)

`registry` (this package) maps names to modules and derives the X-to-Y commands from that one table; each
module's WRITER_OPTIONS (formats/options.py) are its writer's options, from the tables the writer checks.
"""
