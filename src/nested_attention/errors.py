"""The one exception type for mistakes a user can fix (bad input, wrong files, mismatched models)."""


class NestedAttentionError(ValueError):
    """A user-facing error: its message says what was expected, what came, and what to do."""
