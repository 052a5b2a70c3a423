"""edge-llm's own version, as installed."""

from __future__ import annotations


def package_version() -> str:
    """The installed distribution's version; "0" from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-llm")
    except PackageNotFoundError:
        return "0"
