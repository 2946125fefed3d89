"""One typed config object per process, from a TOML file, the environment and flags.

Precedence: explicit overrides (command-line flags) > environment (``PREFIX_FIELD``) >
TOML file > dataclass defaults. Values are coerced to the field's annotated type and the
dataclass validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedmq.errors import ConfigError

__all__ = ["coerce", "load_config"]

C = TypeVar("C")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Coerce a TOML or environment value to the annotated type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none")):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if inner is int:
            if isinstance(value, bool):
                raise ValueError("a bool is not an int")
            return int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if inner is Path:
            return Path(str(value)).expanduser()
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            item_tp = typing.get_args(inner)[0] if typing.get_args(inner) else str
            return tuple(
                coerce(v.strip() if isinstance(v, str) else v, item_tp, name)
                for v in items
                if not (isinstance(v, str) and not v.strip())
            )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    return value


def load_config(
    cls: type[C],
    toml_path: str | Path | None = None,
    *,
    section: str | None = None,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` (a dataclass) from defaults < TOML < environment < overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if section:
            data = data.get(section, {})
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {sorted(unknown)}")
        values.update(data)
    env = os.environ if environ is None else environ
    if env_prefix:
        for name in fields:
            key = f"{env_prefix}{name.upper()}"
            if key in env:
                values[name] = env[key]
    for name, value in (overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    coerced = {k: coerce(v, hints[k], k) for k, v in values.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
