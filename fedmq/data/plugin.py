"""Data-source plugins: a device's own data, handed over by user code once per round.

A plugin is a Python callable (:class:`DataSourcePlugin`) named in the agent's ``source``:

- ``plugin:mypkg.sensors:load_round?path=/var/lib/imu.csv&num_classes=4`` -- a
  ``module:function`` target (the function may be a dotted attribute, ``Class.method``);
- ``plugin:sensors?num_classes=4`` -- a packaged plugin, the entry point named ``sensors`` in
  group :data:`ENTRY_POINT_GROUP` (``fedmq.data_sources``).

The ``?key=value`` options are passed to the callable as ``params`` (strings), except the two
that fedmq reads itself (:data:`RESERVED_OPTIONS`): ``num_classes`` (required: the number of
classes of the device's labels, checked against the model at start-up) and ``limit`` (the
most examples one round may return, default :data:`DEFAULT_LIMIT`).

The target is imported once, at start-up (:func:`load_plugin`; a failure there is a
:class:`~fedmq.errors.DataError`, one line and exit 1 in the agent). The callable is then
called **once per round** the device trains, so it can return fresh data each time (a file
that keeps growing). What it returns is checked by :func:`check_examples` before training;
anything wrong, or an exception raised inside the plugin, is a :class:`PluginDataError`: the
agent logs one line naming the plugin and the problem and skips that round.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from fedmq.errors import DataError

__all__ = [
    "DEFAULT_LIMIT",
    "ENTRY_POINT_GROUP",
    "RESERVED_OPTIONS",
    "DataSourcePlugin",
    "Examples",
    "InputSpec",
    "PluginDataError",
    "PluginSource",
    "check_examples",
    "check_target",
    "load_plugin",
]

log = logging.getLogger(__name__)

#: Entry-point group of packaged plugins (``[project.entry-points."fedmq.data_sources"]``).
ENTRY_POINT_GROUP = "fedmq.data_sources"
#: Most examples one round may return unless the source sets ``limit=N`` (memory bound:
#: 50,000 examples of 64 float32 values are 12.8 MB).
DEFAULT_LIMIT = 50_000
#: Options of a ``plugin:`` source that fedmq reads itself and does not pass to the plugin.
RESERVED_OPTIONS = ("num_classes", "limit")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_TARGET = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PluginDataError(DataError):
    """A plugin raised, or returned examples that cannot be trained on: skip the round."""


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: ``shape`` of one example, its ``dtype``, ``num_classes``."""

    shape: tuple[int, ...]
    dtype: str
    num_classes: int

    def __post_init__(self) -> None:
        dims = tuple(self.shape)
        if not dims or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise DataError(f"input shape must be positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", dims)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DataError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise DataError(f"unknown input dtype {self.dtype!r}") from None


class Examples(NamedTuple):
    """One round's examples: ``x`` (N, *input shape) floats, ``y`` (N,) integer labels.
    A plain ``(x, y)`` tuple is accepted as well."""

    x: np.ndarray
    y: np.ndarray


class DataSourcePlugin(Protocol):
    """The data-source interface: this round's examples for this device.

    Called once per round the device trains (not once at start): read what is new, e.g. the
    newest rows of a file another process keeps appending to. ``params`` are the source's
    ``?key=value`` options (strings) except ``num_classes`` and ``limit``; ``spec`` is the
    model's input (the shape of one example, its dtype and the number of classes).

    Return ``(x, y)`` (or :class:`Examples`): ``x`` a numpy array of shape
    ``(N, *spec.shape)`` with finite values castable to float32, ``y`` ``(N,)`` integers in
    ``[0, spec.num_classes)``, ``1 <= N <= limit``. Anything else, or an exception, skips
    the round on this device (one log line); the plugin is asked again next round.
    """

    def __call__(
        self, device_id: str, round_id: int, params: Mapping[str, str], spec: InputSpec
    ) -> tuple[np.ndarray, np.ndarray]: ...


def check_target(target: str) -> None:
    """Raise DataError unless ``target`` is ``module:function`` or an entry-point name
    (syntax only: imports nothing)."""
    if ":" in target:
        if not _MODULE_TARGET.match(target):
            raise DataError(
                f"data plugin {target!r}: expected module:function (e.g. mypkg.sensors:load)"
            )
    elif not _ENTRY_NAME.match(target):
        raise DataError(
            f"data plugin {target!r}: expected module:function or the name of an entry point "
            f"in group {ENTRY_POINT_GROUP}"
        )


def load_plugin(target: str) -> Callable[..., Any]:
    """Import the plugin callable ``target`` (``module:function`` or an entry-point name).

    Any failure -- no such module or entry point, an error while importing it, not callable --
    is a DataError with one line that names the target.
    """
    check_target(target)
    if ":" in target:
        module_name, _, attr_path = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as exc:  # any error in the user's module is its import error
            raise DataError(
                f"cannot import data plugin {target!r}: {type(exc).__name__}: {exc}"
            ) from exc
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise DataError(f"data plugin {target!r}: {module_name} has no {attr_path!r}")
            obj = getattr(obj, attr)
    else:
        found = entry_points(group=ENTRY_POINT_GROUP, name=target)
        if not found:
            known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise DataError(
                f"no data plugin {target!r} in entry-point group {ENTRY_POINT_GROUP} "
                f"(installed: {', '.join(known) or 'none'})"
            )
        ep = next(iter(found))
        try:
            obj = ep.load()
        except Exception as exc:
            raise DataError(
                f"cannot load data plugin {target!r} ({ep.value}): {type(exc).__name__}: {exc}"
            ) from exc
    if not callable(obj):
        raise DataError(f"data plugin {target!r} is not callable ({type(obj).__name__})")
    return cast(Callable[..., Any], obj)


def check_examples(
    result: Any, spec: InputSpec, limit: int, plugin: str
) -> tuple[np.ndarray, np.ndarray]:
    """``result`` of a plugin as (x float32, y int32), or PluginDataError naming ``plugin``
    and the first thing wrong with it."""

    def bad(what: str) -> PluginDataError:
        return PluginDataError(f"data plugin {plugin}: {what}")

    if not isinstance(result, tuple) or len(result) != 2:
        raise bad(f"must return (x, y), got {_describe(result)}")
    x, y = result
    for name, arr in (("x", x), ("y", y)):
        if not isinstance(arr, np.ndarray):
            raise bad(f"{name} must be a numpy array, got {_describe(arr)}")
    if x.ndim == 0 or x.shape[1:] != spec.shape:
        raise bad(f"x has shape {x.shape}, the model takes (N, {', '.join(map(str, spec.shape))})")
    if y.ndim != 1:
        raise bad(f"y must be 1-D (N,), got shape {y.shape}")
    if len(x) != len(y):
        raise bad(f"x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise bad("returned no examples")
    if len(x) > limit:
        raise bad(f"returned {len(x)} examples, more than the limit of {limit}")
    if x.dtype.kind not in "fiub" or not np.can_cast(x.dtype, spec.dtype, casting="same_kind"):
        raise bad(f"x has dtype {x.dtype}, not castable to {spec.dtype}")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf: refused below
        x32 = np.ascontiguousarray(x, dtype=spec.dtype)
    finite = np.isfinite(x32)
    if not finite.all():
        raise bad(f"x holds {int(finite.size - finite.sum())} non-finite value(s) (NaN or inf)")
    if y.dtype.kind not in "iu":
        raise bad(f"y must hold integer labels, got dtype {y.dtype}")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= spec.num_classes:
        raise bad(f"labels must lie in [0, {spec.num_classes}), got [{low}, {high}]")
    return x32, np.ascontiguousarray(y, dtype=np.int32)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__


class PluginSource:
    """A loaded plugin with its options: :meth:`fetch` calls it and checks the result."""

    def __init__(
        self,
        target: str,
        params: Mapping[str, str] | None = None,
        *,
        limit: int = DEFAULT_LIMIT,
        func: Callable[..., Any] | None = None,
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"data plugin {target!r}: limit must be a positive integer")
        self.target = target
        self.params = dict(params or {})
        self.limit = limit
        self._func = func if func is not None else load_plugin(target)

    def fetch(
        self, device_id: str, round_id: int, spec: InputSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        """This round's checked examples (x float32, y int32), or PluginDataError."""
        try:
            result = self._func(device_id, round_id, dict(self.params), spec)
        except Exception as exc:  # the plugin's own failure skips the round, never the agent
            raise PluginDataError(
                f"data plugin {self.target}: raised {type(exc).__name__}: {exc}"
            ) from exc
        x, y = check_examples(result, spec, self.limit, self.target)
        log.debug("data plugin %s: round %d: %d examples", self.target, round_id, len(x))
        return x, y
