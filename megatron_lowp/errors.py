"""The one exception type for mistakes a user can make (bad recipe, missing file, bad checkpoint).

The CLI prints these as a single line and exits with status 2: no traceback for user mistakes.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the key/file and what is allowed."""


class Preempted(Exception):
    """The run stopped on a signal (SIGTERM: a scheduler's warning before it kills the job) after
    writing a checkpoint; the same command resumes it. The CLI exits with status 143 (128 + SIGTERM)."""

    exit_status = 143
