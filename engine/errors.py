"""Errors a user can fix. run.py prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a config key, a value, a missing or corrupt file. The message says what and how to fix it."""


class ConfigError(UserError):
    """A config file or command-line value is unknown, of the wrong type, or fails validation."""


class DataError(UserError):
    """A dataset source or a .beton file is missing, wrong or corrupt. The message names the file."""
