"""Errors shared by both stages.

A :class:`UserError` is a mistake the user can fix (a wrong path, a bad manifest row, stores that do not fit
together).  The CLI prints its message on one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A user-fixable problem; the message names the file, row or clip and what to do."""

    exit_code = 2
