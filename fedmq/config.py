"""One typed config object per process, from a TOML file, the environment and flags.

Precedence: explicit overrides (command-line flags) > environment (``PREFIX_FIELD``) >
TOML file > dataclass defaults. Values are coerced to the field's annotated type and the
dataclass validates itself in ``__post_init__``.

A field whose type is itself a dataclass (the ``mqtt`` field holding
:class:`~fedmq.net.mqtt.MqttSettings`) is a table of its own: ``[mqtt]`` in the file,
``PREFIX_MQTT_<KEY>`` in the environment, ``"mqtt.<key>"`` in the overrides. Loading is
strict: an unknown table or key, a key outside any table, a missing service table or an
unknown ``PREFIX_*`` variable is a :class:`ConfigError` naming the closest valid name, and
a key that moved (``moved``) names its new place.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def _settings(cls: Any) -> dict[str, Any]:
    """Settable fields of dataclass ``cls``: name -> resolved type."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.init and f.metadata.get("setting", True)
    }


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Schema:
    """Where every setting of ``cls`` lives: the service table and the sub-tables."""

    def __init__(self, cls: Any, section: str, env_prefix: str | None,
                 moved: Mapping[str, str]) -> None:
        self.section = section
        self.env_prefix = env_prefix or ""
        self.moved = dict(moved)
        fields = _settings(cls)
        self.tables: dict[str, Any] = {
            name: tp for name, tp in fields.items() if dataclasses.is_dataclass(tp)
        }
        self.top = {name: tp for name, tp in fields.items() if name not in self.tables}
        self.sub = {name: _settings(tp) for name, tp in self.tables.items()}

    def where(self, dotted: str) -> str:
        """``[mqtt] host`` for ``mqtt.host``, ``[agent] fleet`` for ``fleet``."""
        table, _, key = dotted.rpartition(".")
        return f"[{table or self.section}] {key}"

    def env_name(self, dotted: str) -> str:
        return self.env_prefix + dotted.replace(".", "_").upper()

    def all_names(self) -> list[str]:
        """Every setting as ``fleet`` / ``mqtt.host``."""
        return list(self.top) + [f"{t}.{k}" for t, keys in self.sub.items() for k in keys]

    def home_of(self, key: str) -> str | None:
        """Where a bare ``key`` belongs (``[agent]``, ``[mqtt]``), if anywhere."""
        if key in self.top:
            return f"[{self.section}]"
        for table, keys in self.sub.items():
            if key in keys:
                return f"[{table}]"
        if key in self.moved:
            return self.where(self.moved[key]).split()[0]
        return None

    def unknown_key(self, table: str, key: str) -> str:
        dotted = key if table == self.section else f"{table}.{key}"
        if dotted in self.moved:
            return f"{key!r} moved to {self.where(self.moved[dotted])}"
        names = list(self.top) if table == self.section else list(self.sub[table])
        hint = _suggest(key, names)
        if not hint:
            others = [n for n in self.all_names() if n.rpartition(".")[2] == key]
            if others:
                hint = f" (it belongs under {self.where(others[0]).split()[0]})"
            else:
                close = difflib.get_close_matches(key, [n.rpartition(".")[2] for n in
                                                         self.all_names()], n=1, cutoff=0.6)
                if close:
                    full = next(n for n in self.all_names() if n.rpartition(".")[2] == close[0])
                    hint = f" (did you mean {self.where(full)}?)"
        return f"unknown key {key!r} in [{table}]{hint}"


def _read_file(path: Path, schema: _Schema) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    tables = [schema.section, *schema.sub]
    top: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {t: {} for t in schema.sub}
    for key, value in data.items():
        if not isinstance(value, dict):
            home = schema.home_of(key)
            where = f": put it under {home}" if home else f"; settings go under {tables}"
            raise ConfigError(f"config file {path}: {key!r} is outside any table{where}")
        if key not in tables:
            close = difflib.get_close_matches(key, tables, n=1, cutoff=0.6)
            hint = (f"did you mean [{close[0]}]?" if close else
                    "valid tables: " + ", ".join(f"[{t}]" for t in tables))
            raise ConfigError(f"config file {path}: unknown table [{key}] ({hint})")
        names = schema.top if key == schema.section else schema.sub[key]
        target = top if key == schema.section else sub[key]
        for name, item in value.items():
            if isinstance(item, dict):
                raise ConfigError(
                    f"config file {path}: [{key}.{name}] is not a table of this file"
                    + (f": use [{name}]" if name in schema.sub else "")
                )
            if name not in names:
                raise ConfigError(f"config file {path}: {schema.unknown_key(key, name)}")
            target[name] = item
    if schema.section not in data:
        raise ConfigError(f"config file {path}: no [{schema.section}] table")
    return top, sub


def _read_env(env: Mapping[str, str], schema: _Schema,
              top: dict[str, Any], sub: dict[str, dict[str, Any]]) -> None:
    prefix = schema.env_prefix
    for var in sorted(env):
        if not var.startswith(prefix):
            continue
        rest = var[len(prefix):].lower()
        if rest in schema.top:
            top[rest] = env[var]
            continue
        table = next((t for t in schema.sub if rest.startswith(f"{t}_")
                      and rest[len(t) + 1:] in schema.sub[t]), None)
        if table is not None:
            sub[table][rest[len(table) + 1:]] = env[var]
            continue
        dotted = next((m for m in schema.moved if m.replace(".", "_") == rest), None)
        if dotted is not None:
            new = schema.moved[dotted]
            raise ConfigError(
                f"environment {var}: {dotted.rpartition('.')[2]!r} moved to "
                f"{schema.where(new)} ({schema.env_name(new)})"
            )
        names = [schema.env_name(n) for n in schema.all_names()]
        raise ConfigError(f"environment {var}: unknown setting{_suggest(var, names)}")


def load_config(
    cls: type[C],
    toml_path: str | Path | None = None,
    *,
    section: str,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    moved: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` (a dataclass) from defaults < TOML < environment < overrides.

    ``section`` is the service's table (``[agent]``); tables of dataclass-typed fields sit
    beside it (``[mqtt]``). ``moved`` maps old names (``host``, ``mqtt.backoff_min``) to
    their new dotted place (``mqtt.host``) for the error message. Override keys are field
    names or ``table.key``; ``None`` values are ignored.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    schema = _Schema(cls, section, env_prefix, moved or {})
    top: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {t: {} for t in schema.sub}
    if toml_path is not None:
        top, sub = _read_file(Path(toml_path), schema)
    if env_prefix:
        _read_env(os.environ if environ is None else environ, schema, top, sub)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        table, _, key = name.rpartition(".")
        if not table and key in schema.top:
            top[key] = value
        elif table in schema.sub and key in schema.sub[table]:
            sub[table][key] = value
        elif name in schema.moved:
            raise ConfigError(f"setting {name!r} moved to {schema.where(schema.moved[name])}")
        else:
            raise ConfigError(f"unknown setting {name!r}")
    values = {k: coerce(v, schema.top[k], k) for k, v in top.items()}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for table, given in sub.items():
        tp = schema.tables[table]
        coerced = {k: coerce(v, schema.sub[table][k], f"{table}.{k}") for k, v in given.items()}
        spec = defaults[table]
        if spec.default_factory is not dataclasses.MISSING:
            base = spec.default_factory()
        elif spec.default is not dataclasses.MISSING:
            base = spec.default
        else:
            base = None
        try:
            values[table] = (
                dataclasses.replace(base, **coerced) if base is not None else tp(**coerced)
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{table}]: {exc}") from exc
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
