"""The errors a user can fix. Every one derives from `VlacacheError` and says what is wrong and how to fix it;
`vlacache` commands print such an error as one line and exit 2. Any other exception is a bug: it keeps its
traceback (exit 1). Each also derives from the built-in error it refines (ValueError, KeyError, ...), so
`except ValueError` keeps working."""

from __future__ import annotations


class VlacacheError(Exception):
    """Base of the errors a user can fix (bad input, config, checkpoint, missing assets, ...)."""


class CheckpointError(VlacacheError, ValueError):
    """A checkpoint directory or file is missing, malformed, or does not match the model."""
