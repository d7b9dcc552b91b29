"""The command line shared by the benchmarks that start a llama-server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.server_fixtures import llama_server_binary


def server_bench_args(description: str | None, threads_help: str, results: Path,
                      kv_types: tuple[str, ...] = ()) -> tuple[argparse.Namespace, Path]:
    """Parsed --quick/--threads/--repeats/--output (and --kv-type when `kv_types` are given)
    and the llama-server binary; exits with a message when the server is not built."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help=threads_help)
    parser.add_argument("--repeats", type=int, default=None, help="rounds of runs (default: the sizes' own)")
    parser.add_argument("--output", type=Path, default=results)
    if kv_types:
        parser.add_argument("--kv-type", choices=kv_types, default=kv_types[0], help="KV cache type on both sides")
    args = parser.parse_args()
    binary = llama_server_binary()
    if binary is None:
        print("llama-server is not built; run `make llama-server`", file=sys.stderr)
        sys.exit(1)
    return args, binary
