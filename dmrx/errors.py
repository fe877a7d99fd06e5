"""The one exception type users see.

Anything raised as DmrxError is a problem with the user's input or environment: the CLI prints its
message on one line and exits non-zero, without a traceback. Anything else is a bug in dmrx.
"""


class DmrxError(Exception):
    """A user-facing error whose message names the file and the row, column or dataset at fault."""


class OutputError(DmrxError):
    """Writing an output failed (disk full, no permission, a file where a directory belongs): the input is
    fine. Work committed before the failure (a run's checkpoint, scored chunks) is kept for a resume."""
