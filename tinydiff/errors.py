"""Errors a user can fix. Scripts print the message on one line (`error: ...`) and exit with status 2, never
a traceback (tinydiff/checks.py run_main); the message says what is wrong and how to fix it."""
import sys


class UserError(Exception):
    """Bad input from the user. Scripts print its message on one line and exit with status 2."""


class DataError(UserError):
    """A data problem (source, tokenizer, prepared folder): the message says what is wrong and how to fix it."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
