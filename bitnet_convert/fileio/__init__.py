"""File plumbing under every format: all-or-nothing outputs, early writeback, read-ahead, progress bars,
bounded safetensors reading and writing, held source files that notice a change (sources.py), hub resolution,
provenance and the content hash."""
