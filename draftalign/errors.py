"""Errors the CLI reports as one clear line (no traceback): bad input, not bugs."""


class DraftalignError(Exception):
    """Base of the errors a user can fix by changing input or config."""


class ConfigError(DraftalignError, ValueError):
    """A config that cannot be used; the message names the offending key."""


class VocabMismatchError(DraftalignError, ValueError):
    """Target and draft cannot share a speculative decoder."""
