"""The one exception type for mistakes a user can fix (bad input, wrong files, mismatched models)."""


class NestedAttentionError(ValueError):
    """A user-facing error: its message says what was expected, what came, and what to do."""


def exits_on_error(main):
    """Wrap a command's ``main(argv) -> int``: a NestedAttentionError becomes one ``error:`` line on stderr and exit
    code 2, never a traceback."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except NestedAttentionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped
