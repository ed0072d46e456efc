"""The package's error family: problems a user can fix (a bad setting, file or run directory).

``groupnorm.cli`` prints any ``GroupnormError`` as one line (``groupnorm CMD: error: MESSAGE``) and
exits non-zero, without a traceback; every other exception is a bug and keeps its traceback. So a
message must say what is wrong and where (the key, the file), and how to fix it when that is not
obvious. Each class also derives from the built-in exception its callers would expect (ValueError
for a bad value, OSError for a file), so ``except ValueError`` keeps working.

This module imports nothing: every layer may raise these.
"""
from __future__ import annotations

__all__ = ["GroupnormError", "ConfigError", "DataError", "DatasetNotFoundError", "CheckpointError",
           "RunDirError", "TrainingError"]


class GroupnormError(Exception):
    """Base class: an error whose message is all the user needs (the CLI shows no traceback)."""


class ConfigError(GroupnormError, ValueError):
    """A bad configuration key or value (training options, command-line arguments)."""


class DataError(GroupnormError, ValueError):
    """A dataset file that cannot be used (corrupt, unsafe, inconsistent); the message names it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are not where we looked; the message says how to install or point to them."""


class CheckpointError(GroupnormError, RuntimeError):
    """A checkpoint file that cannot be used (missing, truncated, corrupt, or not ours)."""


class RunDirError(GroupnormError, OSError):
    """A run directory that cannot be used now: busy with another training, holding another run,
    or not a run directory at all."""


class TrainingError(GroupnormError, RuntimeError):
    """A training that cannot go on, e.g. its loss became NaN or infinite."""
