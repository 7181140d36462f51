"""`python -m bitnet_model.native`: build the native kernels now and say what this CPU will use."""

import sys

from bitnet_model.native import available, build, cpu_level, level, library_path, reason

if __name__ == "__main__":
    try:
        build()
    except RuntimeError as exc:  # not fatal: the engine runs on XLA's own products without the kernels
        print(f"native kernels not built ({exc}); the engine will use XLA's products", file=sys.stderr)
        sys.exit(0)
    if available():
        held = "" if level() == cpu_level() else f", held there by BITNET_NATIVE (this CPU: {cpu_level()})"
        print(f"native kernels: {level()}{held} ({library_path()})")
    else:
        print(f"native kernels not used: {reason()}")
