"""Errors a user can cause. The CLI prints their message on one line and exits 2."""

from __future__ import annotations


class ByollmError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""


class ConfigError(ByollmError):
    """A config file or override that does not fit the schema."""


class CheckpointError(ByollmError):
    """A checkpoint that is missing, incomplete or of the wrong architecture."""


class TokenizerError(ByollmError):
    """A tokenizer that is missing, malformed or does not fit the model."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a clear error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ByollmError(
            f"this needs the optional package '{module}' ({e}); install it with: pip install 'byollm[{extra}]'"
        ) from e


class DataError(ByollmError):
    """A dataset that is unknown, missing, corrupt or fails its checksum; or prepared data that does not fit."""
