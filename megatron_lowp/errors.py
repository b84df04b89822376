"""The one exception type for mistakes a user can make (bad recipe, missing file, bad checkpoint).

The CLI prints these as a single line and exits with status 2: no traceback for user mistakes.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the key/file and what is allowed."""
