"""Errors a user can fix. run.py prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a config key, a value, a missing or corrupt file. The message says what and how to fix it."""


class ConfigError(UserError):
    """A config file or command-line value is unknown, of the wrong type, or fails validation."""


class DataError(UserError):
    """A dataset source or a .beton file is missing, wrong or corrupt. The message names the file."""


class RunFailed(UserError):
    """A run that cannot go on: its loss or weights stopped being finite (divergence). The run folder holds
    failed.json; run.py exits with code 3 so scripts can tell it from bad input (2)."""
    exit_code = 3
