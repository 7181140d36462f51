"""Bit layouts of ternary weights, one module per layout. Each takes/returns int8 codes in {-1, 0, +1}."""
