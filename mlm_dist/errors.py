"""The exceptions of a user's mistakes, and the contract they carry.

A `UserError` says the user can fix it: its message names the thing (the key, the option, the
path, the file and line) and the fix. `mlm-dist` prints it as one line,
`mlm-dist <command>: error: <message>`, and exits 2; any other exception is a bug or a failure
nobody foresaw and keeps its traceback. Each subclass also derives from the builtin exception
its sites raised before, so `except ValueError` / `except OSError` / `except RuntimeError`
around them keep working. Errors of one domain live in that domain's module (ConfigError in
config, ShardFormatError in data/shards, ...); here are only the kinds every command shares.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the thing and the fix."""


class UsageError(UserError, ValueError):
    """A command's arguments or options that cannot work as given."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named, or the command needs, is not there."""


class PathExistsError(UserError, FileExistsError):
    """The output the user named is already there; nothing written is ever overwritten."""


class MissingPackageError(UserError, RuntimeError):
    """An optional package the command needs is not installed; the message says what to
    install."""
