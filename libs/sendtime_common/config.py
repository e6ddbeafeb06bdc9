"""Typed reads of environment variables.

Only a service's ``__main__`` calls these, with ``os.environ``; everything below it receives a
settings object, so tests build settings directly and never touch the process environment.
"""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """An environment variable is set to a value that cannot be used."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable's value, or ``default`` when it is unset or empty."""
    value = env.get(name, "").strip()
    return value or default


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """The variable as an integer of at least ``minimum``.

    Raises:
        ConfigError: the value is not an integer or is below ``minimum``.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """The variable as a number of at least ``minimum`` (seconds, ratios).

    Raises:
        ConfigError: the value is not a number or is below ``minimum``.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """The variable as a switch: true/false, yes/no, on/off or 1/0, in any case.

    Raises:
        ConfigError: the value is none of those.
    """
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def secret_from_env(env: Mapping[str, str], name: str) -> str:
    """A secret given as ``NAME`` or, as Kubernetes Secrets are mounted, in the file
    ``NAME_FILE`` (surrounding whitespace dropped); empty when neither is set.

    Raises:
        ConfigError: both are set, or the file cannot be read.
    """
    value = env.get(name, "").strip()
    path = env.get(f"{name}_FILE", "").strip()
    if value and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if not path:
        return value
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
