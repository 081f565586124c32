"""User-facing error types.

A `PomonaError` carries a message written for the person running Pomona: the CLI prints it as-is,
without a traceback, so the message itself must say what went wrong and what to do about it.
"""


class PomonaError(Exception):
    """Base for errors whose message is shown to the user verbatim."""


class ConfigError(PomonaError):
    """cluster.yaml is missing, unreadable or invalid."""


class ModelError(PomonaError):
    """The model cannot be found or described."""


class PlacementError(PomonaError):
    """The model cannot be split across the nodes as configured."""
