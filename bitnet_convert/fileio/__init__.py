"""File plumbing under every format: all-or-nothing outputs, early writeback, read-ahead, progress bars,
bounded safetensors reading and writing, hub resolution, provenance and the content hash."""
