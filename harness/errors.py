"""The one base class the CLI turns into a one-line error and exit code 2.

Every module raises its own subclass (a spec, a checkpoint, an existing output, ...); the CLI
catches `HarnessError` alone, so a new command needs no change to `cli.app.main`.
"""


class HarnessError(Exception):
    """Bad input or an environment problem the user must fix; the message is one line."""
