"""What every `sqt` subcommand shares: the exit statuses and UsageError, a problem with what the
user asked for that sqt.cli reports as one line on stderr with status 2."""

USAGE_ERROR = 2
RUN_FAILED = 1


class UsageError(ValueError):
    """A problem with what the user asked for, reported as one line."""
