"""The library version: the one place it is written (pyproject.toml reads it, and
every layer may import this leaf module)."""

__version__ = "0.1.0"
