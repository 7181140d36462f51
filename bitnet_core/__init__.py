"""The core both packages stand on: config, errors, the tensor-role table, the in-memory checkpoint, the absmean
quantizer, validation and the bit codecs. numpy and ml_dtypes only (and the codecs' own C++ library, compiled on
first use where a compiler is): no file formats, no JAX."""

__version__ = "0.1.0"
