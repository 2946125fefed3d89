"""LiteRT interpreter wrapper for bundles exported by :mod:`fedmq.models.export`.

No TensorFlow needed. The interpreter class is chosen on first use: ``ai-edge-litert``, else
``tflite-runtime``, else ``tensorflow.lite`` (override with ``FEDMQ_TFLITE_RUNTIME``, one of
:data:`RUNTIMES`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.models import tflite_file
from fedmq.models.spec import ModelBundle, ModelSpec, check_weights, load_bundle
from fedmq.models.variants import VARIANT_SIGNATURES

__all__ = [
    "RUNTIMES",
    "TFLiteModel",
    "flex_ops",
    "interpreter_class",
    "runtime_name",
    "runtime_version",
    "softmax_cross_entropy",
    "tflite_op_names",
]

log = logging.getLogger(__name__)

# name -> (module, attribute path of the Interpreter class, distribution)
RUNTIMES: dict[str, tuple[str, str, str]] = {
    "ai-edge-litert": ("ai_edge_litert.interpreter", "Interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "Interpreter", "tflite-runtime"),
    "tensorflow": ("tensorflow", "lite.Interpreter", "tensorflow"),
}
_SIGNATURES = ("train", "infer", "get_weights", "set_weights")
_chosen: tuple[str, Any] | None = None


def _choose() -> tuple[str, Any]:
    global _chosen
    if _chosen is not None:
        return _chosen
    wanted = os.environ.get("FEDMQ_TFLITE_RUNTIME", "").strip()
    if wanted and wanted not in RUNTIMES:
        raise ModelError(f"FEDMQ_TFLITE_RUNTIME={wanted!r} is not one of {', '.join(RUNTIMES)}")
    candidates = [wanted] if wanted else list(RUNTIMES)
    errors: list[str] = []
    for name in candidates:
        module_name, attr, _ = RUNTIMES[name]
        try:
            cls: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        _chosen = (name, cls)
        log.info("TFLite runtime: %s %s", name, runtime_version(name))
        return _chosen
    raise ModelError("no TFLite interpreter available (" + "; ".join(errors) + ")")


def interpreter_class() -> Any:
    """The ``Interpreter`` class of the chosen runtime."""
    return _choose()[1]


def runtime_name() -> str:
    """``"ai-edge-litert"``, ``"tflite-runtime"`` or ``"tensorflow"``."""
    return _choose()[0]


def runtime_version(name: str | None = None) -> str:
    dist = RUNTIMES[name or runtime_name()][2]
    candidates = (dist, "tensorflow-cpu") if dist == "tensorflow" else (dist,)
    for candidate in candidates:
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# -- model inspection ---------------------------------------------------------------------------
def tflite_op_names(model: bytes | str | os.PathLike[str]) -> list[str]:
    """Sorted operator names of a ``.tflite`` (custom ops, e.g. ``FlexConv2D``, by name).

    Read straight from the file's ``operator_codes`` (:mod:`fedmq.models.tflite_file`), which
    covers every subgraph/signature, with no schema module needed: the same answer with
    ai-edge-litert, tflite-runtime or TensorFlow installed. Raises :class:`ModelError` for a
    file that is not a well-formed ``.tflite``.
    """
    if isinstance(model, bytes):
        data = model
    else:
        try:
            data = Path(model).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read {model}: {exc}") from None
    return tflite_file.tflite_op_names(data)


def flex_ops(op_names: list[str]) -> list[str]:
    """The ops that the pip runtimes cannot run (Flex / custom)."""
    return [n for n in op_names if n.startswith("Flex") or n == "CUSTOM" or n.islower()]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy in float64 (numerically stable)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    return np.asarray(logsumexp - z[np.arange(len(labels)), labels])


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# -- the model ------------------------------------------------------------------------------------
class _Runner:
    """One signature with its input tensors allocated once; call with arrays of fixed shape."""

    def __init__(self, interpreter: Any, key: str) -> None:
        self.key = key
        self._runner = interpreter.get_signature_runner(key)
        details = self._runner.get_input_details()
        self.inputs: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {
            name: (tuple(int(d) for d in d_["shape"]), np.dtype(d_["dtype"]))
            for name, d_ in details.items()
        }
        self.outputs = tuple(self._runner.get_output_details())

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the signature. The runtimes' own ``SignatureRunner.__call__`` resizes every
        input to the array's shape first; ai-edge-litert's aarch64 build crashes (SIGSEGV,
        ``memset`` of ``(size_t)-4`` bytes) when it resizes a 0-d input such as ``train``'s
        ``lr``. Our inputs never change shape, so 0-d inputs are not resized; the rest is the
        runner's own sequence (resize, allocate, set, invoke, get). A runtime without those
        internals gets its public call."""
        r = self._runner
        wrapper = getattr(r, "_interpreter_wrapper", None)
        if wrapper is None or not hasattr(r, "_inputs") or not hasattr(r, "_outputs"):
            out: dict[str, np.ndarray] = r(**inputs)
            return out
        sub = getattr(r, "_subgraph_index", 0)
        for name, value in inputs.items():
            if np.ndim(value):
                shape = np.array(np.shape(value), dtype=np.int32)
                wrapper.ResizeInputTensor(r._inputs[name], shape, False, sub)
        wrapper.AllocateTensors(sub)
        for name, value in inputs.items():
            wrapper.SetTensor(r._inputs[name], value, sub)
        wrapper.Invoke(sub)
        return {name: wrapper.GetTensor(index, sub) for name, index in r._outputs}


class TFLiteModel:
    """A bundle loaded into a LiteRT interpreter; weights start as ``bundle.initial_weights``.

    ``set_weights`` takes every trainable tensor (and optionally frozen ones, which otherwise
    keep their last value); ``get_weights`` returns copies of the trainable tensors (or all).
    ``num_threads`` defaults to the CPUs this process may use (the runtimes' own default is
    one thread; two threads trained fmnist-cnn ~1.5x faster on a 2-core machine).
    """

    def __init__(
        self, bundle: ModelBundle | str | os.PathLike[str], num_threads: int | None = None
    ) -> None:
        if not isinstance(bundle, ModelBundle):
            bundle = load_bundle(bundle)
        self.bundle = bundle
        self.spec: ModelSpec = bundle.spec
        self.runtime_name = runtime_name()
        cls = interpreter_class()
        if num_threads is None:
            num_threads = _available_cpus()
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ModelError(f"num_threads must be a positive integer, got {num_threads!r}")
        self.num_threads = num_threads
        kwargs: dict[str, Any] = {"model_path": str(bundle.tflite_path), "num_threads": num_threads}
        try:
            self._interp = cls(**kwargs)
            signatures = set(self._interp.get_signature_list())
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load {bundle.tflite_path}: {exc}") from None
        missing = [k for k in _SIGNATURES if k not in signatures]
        if missing:
            raise ModelError(f"{bundle.tflite_path} lacks signatures {missing}")
        self._runners = {k: _Runner(self._interp, k) for k in _SIGNATURES}
        #: which optional signatures (fedmq.models.variants) this bundle has
        self.variants = frozenset(k for k in VARIANT_SIGNATURES if k in signatures)
        for key in self.variants:
            self._runners[key] = _Runner(self._interp, key)
        self._check_signatures()
        spec = self.spec
        self._x_shape = (spec.train_batch, *spec.input_shape)
        self._lr = np.zeros((), dtype=np.float32)
        self._mu = np.zeros((), dtype=np.float32)
        self._infer_buf = np.zeros((spec.infer_batch, *spec.input_shape), dtype=np.float32)
        self._frozen = {n: bundle.initial_weights[n].copy() for n in spec.frozen}
        self._train_key = "train"  # "train_masked" while a pruning mask is set
        # Variables are garbage (ai-edge-litert) or unreadable (tflite-runtime) until assigned.
        self.set_weights(bundle.initial_weights)

    def _check_signatures(self) -> None:
        spec = self.spec
        expect = {
            "train": {
                "x": (spec.train_batch, *spec.input_shape),
                "y": (spec.train_batch,),
                "w": (spec.train_batch,),
                "lr": (),
            },
            "infer": {"x": (spec.infer_batch, *spec.input_shape)},
            "set_weights": {t.name: t.shape for t in spec.weights},
        }
        for key, shapes in expect.items():
            got = {n: s for n, (s, _) in self._runners[key].inputs.items()}
            if got != shapes:
                raise ModelError(
                    f"signature {key} of {self.bundle.tflite_path} takes {got}, spec says {shapes}"
                )
        outs = set(self._runners["get_weights"].outputs)
        if outs != set(spec.weight_names):
            raise ModelError(f"get_weights returns {sorted(outs)}, spec says {spec.weight_names}")

    # -- weights ------------------------------------------------------------------------------
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights: all trainable tensors are required, frozen ones optional."""
        checked = check_weights(self.spec, weights, partial=True)
        missing = [n for n in self.spec.trainable if n not in checked]
        if missing:
            raise ModelError(f"set_weights is missing trainable weights {missing}")
        for name in self.spec.frozen:
            if name in checked:
                self._frozen[name] = checked[name]
            else:
                checked[name] = self._frozen[name]
        self._runners["set_weights"](**checked)

    def get_weights(self, *, include_frozen: bool = False) -> dict[str, np.ndarray]:
        """Copies of the trainable weights (all weights with ``include_frozen``)."""
        out = self._runners["get_weights"]()
        names = self.spec.weight_names if include_frozen else self.spec.trainable
        return {n: np.array(out[n], dtype=np.float32, copy=True) for n in names}

    # -- compute ------------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, lr: float) -> float:
        """One SGD step on exactly ``train_batch`` examples; returns the loss before it."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != self._x_shape:
            raise ModelError(f"train_step x has shape {x.shape}, expected {self._x_shape}")
        y = np.asarray(y, dtype=np.int32)
        w = np.asarray(w, dtype=np.float32)
        if y.shape != (self.spec.train_batch,) or w.shape != (self.spec.train_batch,):
            raise ModelError(
                f"train_step y/w must have shape ({self.spec.train_batch},), "
                f"got {y.shape} / {w.shape}"
            )
        self._lr[()] = lr
        out = self._runners[self._train_key](x=x, y=y, w=w, lr=self._lr)
        return float(out["loss"])

    def set_mask(self, masks: Mapping[str, np.ndarray] | None) -> None:
        """Prune: :meth:`train_step` runs ``train_masked`` under ``masks`` (0/1 per trainable
        tensor; a tensor not named is kept whole) until ``set_mask(None)`` (plain ``train``)."""
        if masks is None:
            self._train_key = "train"
            return
        runner = self._variant("set_mask")
        self._variant("train_masked")
        unknown = set(masks) - set(self.spec.trainable)
        if unknown:
            raise ModelError(f"set_mask names tensors that are not trainable: {sorted(unknown)}")
        shapes = {t.name: t.shape for t in self.spec.weights}
        full: dict[str, np.ndarray] = {}
        for n in self.spec.trainable:
            m = masks.get(n)
            value = np.ones(shapes[n], np.float32) if m is None else np.asarray(m, np.float32)
            if value.shape != shapes[n]:
                raise ModelError(f"mask of {n} has shape {value.shape}, the model {shapes[n]}")
            full[n] = value
        runner(**full)
        self._train_key = "train_masked"

    def _check_batch(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray
    ]:
        x = np.asarray(x, dtype=np.float32)
        if x.shape != self._x_shape:
            raise ModelError(f"x has shape {x.shape}, expected {self._x_shape}")
        y = np.asarray(y, dtype=np.int32)
        w = np.asarray(w, dtype=np.float32)
        b = self.spec.train_batch
        if y.shape != (b,) or w.shape != (b,):
            raise ModelError(f"y/w must have shape ({b},), got {y.shape} / {w.shape}")
        return x, y, w

    def _variant(self, key: str) -> _Runner:
        runner = self._runners.get(key)
        if runner is None:
            raise ModelError(
                f"{self.bundle.tflite_path} has no {key} signature (exported before it "
                "existed: export the model again)"
            )
        return runner

    def set_global(self, weights: Mapping[str, np.ndarray]) -> None:
        """The round's global weights (every trainable tensor) for :meth:`train_prox_step`."""
        checked = check_weights(self.spec, weights, partial=True)
        missing = [n for n in self.spec.trainable if n not in checked]
        if missing:
            raise ModelError(f"set_global is missing trainable weights {missing}")
        self._variant("set_global")(**{n: checked[n] for n in self.spec.trainable})

    def train_prox_step(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray, lr: float, mu: float
    ) -> float:
        """One FedProx SGD step (proximal weight ``mu`` towards :meth:`set_global`'s weights);
        returns the data loss before it."""
        runner = self._variant("train_prox")
        x, y, w = self._check_batch(x, y, w)
        self._lr[()] = lr
        self._mu[()] = mu
        return float(runner(x=x, y=y, w=w, lr=self._lr, mu=self._mu)["loss"])

    def gradient(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray
    ) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, gradient per trainable tensor) of the weighted mean loss of one batch."""
        runner = self._variant("gradient")
        x, y, w = self._check_batch(x, y, w)
        out = runner(x=x, y=y, w=w)
        grads = {n: np.array(out[n], dtype=np.float32, copy=True) for n in self.spec.trainable}
        return float(out["loss"]), grads

    def prepare_inputs(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float32 ``[N, *input_shape]`` (flat rows are reshaped)."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.spec.input_shape
        if x.shape[1:] != shape:
            per = int(np.prod(shape))
            if x.ndim < 1 or x.size != len(x) * per:
                raise ModelError(f"inputs of shape {x.shape} do not match model input {shape}")
            x = x.reshape((len(x), *shape))
        return x

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[N, num_classes]`` for any N (chunks of ``infer_batch``, zero-padded)."""
        x = self.prepare_inputs(x)
        n, b = len(x), self.spec.infer_batch
        out = np.empty((n, self.spec.num_classes), dtype=np.float32)
        runner = self._runners["infer"]
        for start in range(0, n, b):
            chunk = x[start : start + b]
            m = len(chunk)
            if m == b:
                batch = np.ascontiguousarray(chunk)
            else:
                batch = self._infer_buf
                batch[:m] = chunk
                batch[m:] = 0.0
            out[start : start + m] = runner(x=batch)["logits"][:m]
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over all examples."""
        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != len(x):
            raise ModelError(f"labels of shape {labels.shape} do not match {len(x)} examples")
        if len(labels) == 0:
            raise ModelError("cannot evaluate on zero examples")
        if labels.min() < 0 or labels.max() >= self.spec.num_classes:
            raise ModelError(f"labels outside [0, {self.spec.num_classes})")
        logits = self.predict(x)
        labels = labels.astype(np.int64)
        loss = float(softmax_cross_entropy(logits, labels).mean())
        acc = float((logits.argmax(axis=1) == labels).mean())
        return loss, acc
