"""One module per on-disk format, each with the same small interface (the spokes of the hub):

    NAME: str                                   # "hf", "flax", "npz", "gguf"
    def detect(path: Path) -> bool              # cheap sniff: is this path in my format?
    def read(path: str, *, revision: str | None = None) -> Checkpoint
        # lazy: tensors load on demand from memory-mapped input; validates names/shapes against the config
        # (bitnet_convert.validate) and raises ConvertError naming the file on anything wrong.
    def write(ckpt: Checkpoint, out: str, *, force: bool = False, quiet: bool = True, **options) -> Path
        # streams tensor by tensor through bitnet_convert.atomic.atomic_path (all or nothing),
        # shows bitnet_convert.progress unless quiet, records provenance + content hash
        # (bitnet_convert.integrity) in the output.
    def stored_tensor_bytes(path) -> Iterator[tuple[str, memoryview]]
        # the raw stored bytes of each tensor in file order; `inspect --check` hashes them
        # with integrity.TensorHasher and compares with the hash recorded at write time.
    def recorded_provenance(path) -> dict | None  # what the writer recorded (None for foreign files)

`bitnet_convert.registry` maps names to modules and derives the X-to-Y commands from that one table.
"""
