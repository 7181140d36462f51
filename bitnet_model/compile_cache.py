"""The cache folder of the engine, and JAX's persistent compilation cache in it.

A `generate` compiles its prefill and decode programs before the prompt goes in: seconds of XLA for a 30-layer
model on two cores, every run, while llama.cpp starts in about one. With the persistent cache, XLA's
executables are kept on disk (`<cache folder>/jax`) and a second run with the same shapes loads them instead.
The native kernels' FFI calls are kept by target name and resolved again when a program is loaded, so the
kernels must be registered first: the engine's Options.for_backend loads them before anything compiles.

The cache folder: `$BITNET_CONVERT_CACHE`, else `$XDG_CACHE_HOME/bitnet-convert`, else `~/.cache/bitnet-convert`
(the native kernels' library lives in its `native` folder). A folder set for JAX itself
(`JAX_COMPILATION_CACHE_DIR`, or jax.config) is used as it is; `BITNET_CONVERT_JAX_CACHE=0` keeps compilation
in memory. JAX treats the folder as trusted: whoever can write into it can run code in the process, like the
native folder's library.
"""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path

from bitnet_core.cache import cache_root

OFF_ENV = "BITNET_CONVERT_JAX_CACHE"
# JAX's monitoring events: a compilation that asked the persistent cache, and one the cache answered
REQUEST, HIT = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_hits"
_events: collections.Counter = collections.Counter()


def enable() -> Path | None:
    """Turn the persistent compilation cache on (call before the process compiles anything: JAX decides once
    whether it uses a cache); returns its folder, or None when it is off."""
    import jax

    if os.environ.get(OFF_ENV) == "0":
        return None
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        folder = str(cache_root() / "jax")
        jax.config.update("jax_compilation_cache_dir", folder)
    # Every program, however quick to compile or small: the defaults keep only those that took a second or more,
    # and the decode step and the loader's small programs add up to seconds together.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _listen()
    return Path(folder)


@functools.cache
def _listen() -> None:
    import jax

    jax.monitoring.register_event_listener(lambda event, **_: _events.update((event,)))


def folder() -> Path | None:
    """The persistent cache's folder (None: off)."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    return None if os.environ.get(OFF_ENV) == "0" or not configured else Path(configured)


def programs() -> tuple[int, int]:
    """(loaded from the persistent cache, compiled and written to it) since `enable`, in this process."""
    return _events[HIT], _events[REQUEST] - _events[HIT]
