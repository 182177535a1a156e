"""Errors a user can fix: scripts print the message on one line (`error: ...`) and exit with status 2, never a
traceback (tinydiff/run.py run_main). The message says what is wrong and how to fix it."""
import sys


class UserError(Exception):
    """Bad input from the user."""


class DataError(UserError):
    """A data problem (source, tokenizer, prepared folder)."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
