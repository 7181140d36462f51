"""`python -m bitnet_convert ...` is the `bitnet-convert` command."""

from bitnet_convert.cli import main

main()
