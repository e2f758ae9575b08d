"""Errors the CLI reports as one line (no traceback unless --debug)."""


class TracerlError(Exception):
    """Base class of user-facing errors: the message says what to change."""


class CheckpointError(TracerlError):
    """A checkpoint could not be written or read."""


class EnvironmentStepError(TracerlError):
    """An environment (e.g. its reward function) raised while scoring a model turn."""


class DataError(TracerlError):
    """A dataset or split is empty or malformed."""


class OptionError(TracerlError, ValueError):
    """An unknown name or option (registry lookup, environment option)."""


class ModelLoadError(TracerlError, FileNotFoundError):
    """A model directory is missing or incomplete."""


class NotAModelDirError(TracerlError, NotADirectoryError):
    """A model path points at a file."""
