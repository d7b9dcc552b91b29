#!/usr/bin/env python3
"""Run the cached-prompts CLI from a checkout: `./main.py outputs-test-prompts`.

Uses the project's .venv (made by `make setup`) when the current Python lacks the
dependencies, so the script works without activating anything.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))

try:
    import llama_cpp  # noqa: F401
except ImportError:
    venv = HERE / ".venv"
    venv_python = venv / "bin" / "python"
    # Compare prefixes, not executables: a venv's python is usually a link to the very file
    # the system's python is, and only its prefix (from pyvenv.cfg) tells them apart.
    if venv_python.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit("error: llama-cpp-python is not installed; run `make setup` in " + str(HERE))

from cached_prompts.cli.main import main  # noqa: E402

sys.exit(main())
