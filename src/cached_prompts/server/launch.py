"""Flags for a llama-server that this project starts (tests, benchmarks) or tells users to start.

llama.cpp's AMX weight path (built where the build machine's CPU has AMX, as a native build of
llama-server is) segfaults at the first decode; `--no-repack` keeps weights out of the extra CPU
buffer types, as `--lp-repack auto` does for the local engine (local/engine.py says more).
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MAX_CPUINFO_BYTES = 16 << 20  # a 512-core machine's cpuinfo is about 1 MB


def cpu_has_amx(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this machine's CPU has AMX for int8 (Linux: the `amx_int8` flag); False elsewhere."""
    try:
        with cpuinfo.open("rb") as stream:
            text = stream.read(MAX_CPUINFO_BYTES)
    except OSError:
        return False
    return any(line.startswith(b"flags") and b" amx_int8" in line for line in text.splitlines())


def safe_server_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """What a llama-server built on this machine needs so that it does not crash on its CPU."""
    return ["--no-repack"] if cpu_has_amx(cpuinfo) else []
