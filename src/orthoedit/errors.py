"""Exception types. The CLI turns them into one-line messages and exit codes (2 = bad input)."""


class OrthoeditError(Exception):
    """Base class for errors orthoedit reports to the user."""

    exit_code = 2


class BadInputError(OrthoeditError):
    """The user gave something orthoedit cannot use: a file, a model, an option."""


class UnsupportedModelError(BadInputError):
    """The model's architecture or storage format is not supported."""


class CheckFailedError(OrthoeditError):
    """A check ran and its result is outside tolerance (verify, regression gates)."""

    exit_code = 1


class RemoteError(OrthoeditError):
    """The Hub (or the network) failed part-way; running the command again resumes."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every output cleans up as on Ctrl-C."""
