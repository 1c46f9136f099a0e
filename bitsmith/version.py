"""The package version, importable without importing the rest of bitsmith."""

__version__ = "0.1.0"
