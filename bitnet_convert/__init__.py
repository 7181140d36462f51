"""bitnet-convert: move BitNet b1.58 checkpoints between formats and prove nothing was lost."""

__version__ = "0.1.0"
