"""The package version, in one place (read by pyproject.toml and laplacefim --version)."""

__version__ = "0.1.0"
