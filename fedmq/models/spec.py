"""Model bundles: ``model.tflite`` + ``spec.json`` + ``initial.npz`` in one directory.

Pure module (numpy + json): devices load bundles without TensorFlow.

``ModelSpec.weights`` lists every variable the exported model holds, in a fixed order; these
are the inputs of the ``set_weights`` signature and the outputs of ``get_weights``.
``ModelSpec.trainable`` is the subset the ``train`` signature updates: the federated tensors.
Frozen weights (fine-tuning with ``head_only``) are loaded once from ``initial.npz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.fsutil import atomic_write

__all__ = [
    "BUNDLE_FORMAT",
    "INITIAL_FILE",
    "MODEL_FILE",
    "SPEC_FILE",
    "ModelBundle",
    "ModelSpec",
    "TensorSpec",
    "check_weights",
    "load_bundle",
    "prebuilt_bundle_path",
    "prebuilt_names",
    "save_bundle",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MODEL_FILE = "model.tflite"
SPEC_FILE = "spec.json"
INITIAL_FILE = "initial.npz"
WEIGHT_DTYPES = frozenset({"float32"})
INPUT_DTYPES = frozenset({"float32"})
MAX_SPEC_BYTES = 1 << 20
_FILE_MODE = 0o644  # bundles are shipped artefacts, not secrets

# Tensor names become TFLite signature argument names: keep them identifiers.
_TENSOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"


def _shape(value: Any, what: str, *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise ModelError(f"{what} must be a sequence of positive integers, got {value!r}")
    dims = tuple(value)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or int(d) < 1:
            raise ModelError(f"{what} must be a sequence of positive integers, got {value!r}")
    if not dims and not allow_empty:
        raise ModelError(f"{what} must not be empty")
    return tuple(int(d) for d in dims)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One named weight tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TENSOR_NAME.match(self.name):
            raise ModelError(
                f"tensor name {self.name!r} must match {_TENSOR_NAME.pattern} "
                "(it becomes a signature argument)"
            )
        object.__setattr__(
            self, "shape", _shape(self.shape, f"shape of {self.name}", allow_empty=True)
        )
        if self.dtype not in WEIGHT_DTYPES:
            raise ModelError(
                f"dtype of {self.name} is {self.dtype!r}; allowed: {sorted(WEIGHT_DTYPES)}"
            )

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Any) -> TensorSpec:
        if not isinstance(obj, Mapping):
            raise ModelError(f"tensor spec must be an object, got {type(obj).__name__}")
        unknown = set(obj) - {"name", "shape", "dtype"}
        if unknown:
            raise ModelError(f"tensor spec has unknown fields {sorted(unknown)}")
        try:
            return cls(name=obj["name"], shape=obj["shape"], dtype=obj.get("dtype", "float32"))
        except KeyError as exc:
            raise ModelError(f"tensor spec is missing {exc.args[0]!r}") from None


@dataclass(frozen=True)
class ModelSpec:
    """What a device needs to know about a model besides the ``.tflite`` itself.

    Labels are int32 class ids; inputs are ``input_dtype`` arrays of ``input_shape`` per
    example. ``train`` runs on exactly ``train_batch`` examples, ``infer`` on ``infer_batch``.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    train_batch: int
    infer_batch: int
    weights: tuple[TensorSpec, ...]
    trainable: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MODEL_NAME.match(self.name):
            raise ModelError(
                f"model name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'"
            )
        if not isinstance(self.kind, str) or not self.kind:
            raise ModelError("model kind must be a non-empty string")
        object.__setattr__(
            self, "input_shape", _shape(self.input_shape, "input_shape", allow_empty=False)
        )
        if self.input_dtype not in INPUT_DTYPES:
            raise ModelError(
                f"input_dtype {self.input_dtype!r} not supported; allowed: {sorted(INPUT_DTYPES)}"
            )
        _positive_int(self.num_classes, "num_classes")
        if self.num_classes < 2:
            raise ModelError(f"num_classes must be at least 2, got {self.num_classes}")
        _positive_int(self.train_batch, "train_batch")
        _positive_int(self.infer_batch, "infer_batch")
        weights = tuple(self.weights)
        if not weights or not all(isinstance(w, TensorSpec) for w in weights):
            raise ModelError("weights must be a non-empty sequence of TensorSpec")
        names = [w.name for w in weights]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ModelError(f"duplicate weight names {dupes}")
        object.__setattr__(self, "weights", weights)
        if isinstance(self.trainable, str):
            raise ModelError("trainable must be a sequence of weight names, not a string")
        trainable = tuple(self.trainable)
        if not trainable:
            raise ModelError("at least one weight must be trainable")
        unknown = [n for n in trainable if n not in names]
        if unknown:
            raise ModelError(f"trainable names {unknown} are not weights of the model")
        if len(set(trainable)) != len(trainable):
            raise ModelError("trainable names must be unique")
        # Keep the canonical (weights) order so every party iterates identically.
        object.__setattr__(self, "trainable", tuple(n for n in names if n in set(trainable)))
        if not isinstance(self.extra, dict):
            raise ModelError("extra must be a JSON object")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"extra is not JSON-serialisable: {exc}") from None

    # -- derived -------------------------------------------------------------------------
    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.weights)

    @property
    def trainable_specs(self) -> tuple[TensorSpec, ...]:
        keep = set(self.trainable)
        return tuple(w for w in self.weights if w.name in keep)

    @property
    def frozen(self) -> tuple[str, ...]:
        keep = set(self.trainable)
        return tuple(w.name for w in self.weights if w.name not in keep)

    @property
    def num_params(self) -> int:
        return sum(w.size for w in self.weights)

    @property
    def num_trainable_params(self) -> int:
        return sum(w.size for w in self.trainable_specs)

    def weight(self, name: str) -> TensorSpec:
        for w in self.weights:
            if w.name == name:
                return w
        raise ModelError(f"model {self.name} has no weight {name!r}")

    # -- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "num_classes": self.num_classes,
            "train_batch": self.train_batch,
            "infer_batch": self.infer_batch,
            "weights": [w.to_json() for w in self.weights],
            "trainable": list(self.trainable),
            "extra": self.extra,
        }

    def dumps(self) -> str:
        """Readable JSON: one top-level field per line, one weight per line."""
        lines = []
        for key, value in self.to_json().items():
            if key == "weights":
                items = ",\n".join(f"    {json.dumps(w)}" for w in value)
                text = f"[\n{items}\n  ]"
            else:
                text = json.dumps(value, allow_nan=False)
            lines.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, obj: Any) -> ModelSpec:
        if not isinstance(obj, Mapping):
            raise ModelError(f"model spec must be a JSON object, got {type(obj).__name__}")
        fmt = obj.get("format", BUNDLE_FORMAT)
        if fmt != BUNDLE_FORMAT:
            raise ModelError(
                f"unsupported bundle format {fmt!r} (this fedmq reads {BUNDLE_FORMAT})"
            )
        required = (
            "name",
            "kind",
            "input_shape",
            "num_classes",
            "train_batch",
            "infer_batch",
            "weights",
            "trainable",
        )
        missing = [k for k in required if k not in obj]
        if missing:
            raise ModelError(f"model spec is missing {missing}")
        allowed = {*required, "format", "input_dtype", "extra"}
        unknown = set(obj) - allowed
        if unknown:
            raise ModelError(f"model spec has unknown fields {sorted(unknown)}")
        weights = obj["weights"]
        if not isinstance(weights, list):
            raise ModelError("model spec 'weights' must be a list")
        trainable = obj["trainable"]
        if not isinstance(trainable, list) or not all(isinstance(t, str) for t in trainable):
            raise ModelError("model spec 'trainable' must be a list of names")
        return cls(
            name=obj["name"],
            kind=obj["kind"],
            input_shape=obj["input_shape"],
            input_dtype=obj.get("input_dtype", "float32"),
            num_classes=obj["num_classes"],
            train_batch=obj["train_batch"],
            infer_batch=obj["infer_batch"],
            weights=tuple(TensorSpec.from_json(w) for w in weights),
            trainable=tuple(trainable),
            extra=dict(obj.get("extra", {})),
        )

    @classmethod
    def loads(cls, text: str | bytes) -> ModelSpec:
        if len(text) > MAX_SPEC_BYTES:
            raise ModelError(f"model spec larger than {MAX_SPEC_BYTES} bytes")
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"model spec is not valid JSON: {exc}") from None
        return cls.from_json(obj)


def check_weights(
    spec: ModelSpec,
    weights: Mapping[str, np.ndarray],
    *,
    names: tuple[str, ...] | None = None,
    partial: bool = False,
) -> dict[str, np.ndarray]:
    """Validate ``weights`` against ``spec``; return C-contiguous float32 copies.

    ``names`` is the expected set (default: all weights); with ``partial`` a subset is fine.
    Values must already be float32 (no silent down-casts of float64) and finite.
    """
    expected = spec.weight_names if names is None else names
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ModelError(f"unknown weight names {unknown} for model {spec.name}")
    missing = [n for n in expected if n not in weights]
    if missing and not partial:
        raise ModelError(f"missing weights {missing} for model {spec.name}")
    out: dict[str, np.ndarray] = {}
    for name in expected:
        if name not in weights:
            continue
        ts = spec.weight(name)
        arr = np.asarray(weights[name])
        if arr.dtype != np.dtype(ts.dtype):
            raise ModelError(f"weight {name} has dtype {arr.dtype}, expected {ts.dtype}")
        if arr.shape != ts.shape:
            raise ModelError(f"weight {name} has shape {arr.shape}, expected {ts.shape}")
        if not np.all(np.isfinite(arr)):
            raise ModelError(f"weight {name} has non-finite values")
        out[name] = np.array(arr, dtype=ts.dtype, order="C", copy=True)
    return out


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle directory. ``initial_weights`` holds every weight in ``spec.weights``."""

    path: Path
    spec: ModelSpec
    tflite_path: Path
    initial_weights: dict[str, np.ndarray]

    def tflite_bytes(self) -> bytes:
        return self.tflite_path.read_bytes()

    def tflite_sha256(self) -> str:
        return hashlib.sha256(self.tflite_bytes()).hexdigest()

    def initial_trainable(self) -> dict[str, np.ndarray]:
        """Copies of the initial federated (trainable) tensors."""
        return {n: self.initial_weights[n].copy() for n in self.spec.trainable}


def load_bundle(path: str | os.PathLike[str]) -> ModelBundle:
    """Load and validate a bundle directory (or the ``spec.json`` inside it)."""
    root = Path(path)
    if root.is_file() and root.name == SPEC_FILE:
        root = root.parent
    if not root.is_dir():
        raise ModelError(f"model bundle {root} is not a directory")
    spec_path, tflite_path, init_path = root / SPEC_FILE, root / MODEL_FILE, root / INITIAL_FILE
    for p in (spec_path, tflite_path, init_path):
        if not p.is_file():
            raise ModelError(f"model bundle {root} has no {p.name}")
    spec = ModelSpec.loads(spec_path.read_bytes())
    try:
        with np.load(init_path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {init_path}: {exc}") from None
    initial = check_weights(spec, raw)
    log.debug("loaded model bundle %s (%s, %d params)", root, spec.name, spec.num_params)
    return ModelBundle(path=root, spec=spec, tflite_path=tflite_path, initial_weights=initial)


def save_bundle(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    tflite: bytes,
    initial_weights: Mapping[str, np.ndarray],
) -> ModelBundle:
    """Write a bundle directory (created if needed; files replaced atomically)."""
    if not tflite:
        raise ModelError("refusing to save an empty .tflite model")
    weights = check_weights(spec, initial_weights)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / MODEL_FILE, tflite, _FILE_MODE)
    atomic_write(root / SPEC_FILE, spec.dumps().encode(), _FILE_MODE)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".initial.", suffix=".npz")
    os.close(fd)
    try:
        savez: Any = np.savez  # the stubs type **kwds as if it could be allow_pickle
        savez(tmp, **{n: weights[n] for n in spec.weight_names})
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, root / INITIAL_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return load_bundle(root)


def prebuilt_names() -> tuple[str, ...]:
    """Names of the bundles shipped inside the package."""
    if not _PREBUILT_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in _PREBUILT_DIR.iterdir() if (p / SPEC_FILE).is_file()))


def prebuilt_bundle_path(name: str) -> Path:
    """Directory of a packaged bundle, e.g. ``prebuilt_bundle_path("digits-mlp")``."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ModelError(f"invalid prebuilt model name {name!r}")
    path = _PREBUILT_DIR / name
    if not (path / SPEC_FILE).is_file():
        raise ModelError(
            f"no prebuilt model {name!r}; available: {', '.join(prebuilt_names()) or 'none'}"
        )
    return path
