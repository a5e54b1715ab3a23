"""poolscope's own settings (``POOLSCOPE_*``), parsed with clear errors, and the internal-error guard."""

import logging
import os

logger = logging.getLogger("poolscope")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class ConfigError(ValueError):
    """A setting has a value poolscope cannot use; the message says which and why."""


def env_bool(name, default=False):
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def _env_number(name, default, convert, kind, valid, bound):
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not valid(value):
        raise ConfigError(f"{name}={raw!r} must be {bound}")
    return value


def env_int(name, default, minimum=1):
    return _env_number(name, default, int, "a whole number", lambda v: v >= minimum,
                       f"at least {minimum}")


def env_seconds(name, default):
    return _env_number(name, default, float, "a number of seconds", lambda v: v > 0,
                       "more than 0")


def setting(reader, name, default, *args):
    """Read a setting for the library API: a bad value is logged once and the default used."""
    try:
        return reader(name, default, *args)
    except ConfigError as exc:
        logger.error("poolscope: %s; using %r", exc, default)
        return default


_reported = set()
try:  # a bad value is reported by instrument() and refused by the launcher
    strict = env_bool("POOLSCOPE_STRICT")
except ConfigError:
    strict = False


def internal_error(where):
    """Call from an ``except`` block: log poolscope's own failure once per site and swallow it.

    With ``POOLSCOPE_STRICT=true`` (tests) the exception is re-raised instead.
    """
    if strict:
        raise
    if where not in _reported:
        _reported.add(where)
        logger.warning("poolscope: internal error in %s ignored; the application is not affected",
                       where, exc_info=True)
