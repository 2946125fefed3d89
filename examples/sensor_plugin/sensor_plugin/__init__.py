"""Example fedmq data-source plugin: the newest windows of a sensor CSV that grows.

Another process (the sensor service) keeps appending rows such as ``ax,ay,az,temp,label`` to
a CSV file with a header. Each round the agent calls :func:`load_round`, which reads the
file as it is now, cuts it into windows with fedmq's own reader
(:func:`fedmq.data.datasets.load_csv_windows`: windows of ``window`` rows every ``stride``
rows, labelled by their last row), keeps the ``newest`` windows and returns them shaped as
the model's input. Agent configuration::

    source = "plugin:sensor_plugin:load_round?num_classes=10&path=/var/lib/imu.csv&window=16"

(or ``plugin:sensors?...`` once this package is installed: it registers the entry point
``sensors`` in group ``fedmq.data_sources``).

Options (all strings in ``params``): ``path`` (required), ``window`` (rows per window,
required), ``stride`` (default ``window``), ``label`` (label column, default ``label``),
``features`` (comma-separated columns, default all but the label), ``classes``
(comma-separated label names mapped to ids, default integer labels), ``newest`` (keep only
the newest N windows, default all).

A window of ``window`` rows x F features is handed over as it is when the model takes
(window, F), or flattened/reshaped when the model's input has the same number of values
(e.g. 16 rows x 4 features for a model of input (64,)). The writer must append whole lines
(one ``write`` per line or line buffering): a half-written last line makes that round fail
with one log line, and the next round reads the completed file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmq.data.datasets import load_csv_windows
from fedmq.data.plugin import Examples, InputSpec

__all__ = ["load_round"]


def _int(params: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = params.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"option {key}=N is required")
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"option {key} must be >= 1, got {raw!r}")
    return value


def _names(params: Mapping[str, str], key: str) -> list[str] | None:
    raw = params.get(key)
    return [n.strip() for n in raw.split(",")] if raw else None


def load_round(
    device_id: str, round_id: int, params: Mapping[str, str], spec: InputSpec
) -> Examples:
    """This round's examples: the newest windows of the CSV at ``params['path']``."""
    if "path" not in params:
        raise ValueError("option path=FILE is required")
    window = _int(params, "window")
    data = load_csv_windows(
        params["path"],
        window=window,
        stride=_int(params, "stride", window),
        label_column=params.get("label", "label"),
        feature_columns=_names(params, "features"),
        classes=_names(params, "classes"),
    )
    x, y = data.x, data.y
    if "newest" in params:
        keep = _int(params, "newest")
        x, y = x[-keep:], y[-keep:]
    if x.shape[1:] != spec.shape:
        if math.prod(x.shape[1:]) != math.prod(spec.shape):
            raise ValueError(
                f"windows of {x.shape[1:]} do not fit the model's input {spec.shape}"
            )
        x = x.reshape((len(x), *spec.shape))
    return Examples(np.ascontiguousarray(x), y)
