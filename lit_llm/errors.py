"""Exceptions raised for user mistakes.

Every message names the offending key, value or path and says how to fix it.
"""

from __future__ import annotations


class LitLLMError(Exception):
    """Base class of every error lit_llm raises for a user mistake."""


class ConfigError(LitLLMError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class DataError(LitLLMError, ValueError):
    """A data source is missing, empty, malformed or too small."""


class CheckpointError(LitLLMError):
    """A checkpoint or weights file is missing, corrupt or does not match the model."""


class NonFiniteLossError(LitLLMError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""
