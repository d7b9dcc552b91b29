"""The installed package's version, read from its metadata (one place: pyproject.toml)."""

from importlib import metadata

try:
    __version__ = metadata.version("cached-prompts")
except metadata.PackageNotFoundError:  # a checkout on sys.path without `pip install -e .`
    __version__ = "0+unknown"
