"""Errors the CLI reports as one line (no traceback unless --debug)."""

import os
import re


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


# ---------------------------------------------------------------------------------------------
# one line per pydantic validation error (config keys and environment options share the wording)

_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
_TYPE_TAGS = ("str", "int", "float", "bool", "none", "[key]")  # union members pydantic adds to an error's loc


def validation_key(loc: tuple) -> str:
    """The dotted key of a pydantic error location, without the union-member tags pydantic inserts."""
    def tag(p) -> bool:
        return isinstance(p, str) and (p in _TYPE_TAGS or p.endswith("]") and "[" in p)
    return ".".join(str(p) for p in loc if not tag(p))


def shown(value: object, limit: int = 60) -> str:
    """A bad value as it goes into a one-line message (repr, cut to `limit` characters)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_problem(err: dict) -> str:
    """What is wrong with one value of a pydantic error (`ValidationError.errors()[i]`), e.g.
    "must be >= 1, got 0"; the message of a validator's ValueError as it is."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return f"must be {op} {ctx[name]}, got {shown(err.get('input'))}"
    if kind in ("value_error", "assertion_error"):
        return err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "missing":
        return "is required"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return f"must not be empty, got {shown(err.get('input'))}"
    msg = err["msg"].replace("Input should be ", "must be ", 1)
    if kind != "literal_error":  # pydantic's own reason ("unable to parse string as an integer") adds nothing
        msg = msg.split(", unable to ")[0].split(", got ")[0]
    return f"{msg}, got {shown(err.get('input'))}"


def error_reason(e: BaseException) -> str:
    """One line for an I/O error; safetensors reports the errno (e.g. a full disk) only in its message."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os error (\d+)", str(e))
    code = code or (int(found[1]) if found else None)
    if code:
        return os.strerror(code).lower()
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
