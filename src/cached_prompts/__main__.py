"""`python -m cached_prompts`: the command line."""

import sys

from cached_prompts.cli.main import main

sys.exit(main())
