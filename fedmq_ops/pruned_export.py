"""``fedmq model export --pruned BUNDLE --weights MODEL.npz --out FILE.tflite``: a compact
inference-only model of a pruned federation's result (docs/pruning.md; needs TensorFlow).

The trained bundle carries five training signatures and the weights as variables. For
inference on a device that only predicts, this writes one ``.tflite`` with a single
signature ``infer(x) -> {logits}`` (batch ``infer_batch``) and the weights as constants:
the zoo forward pass traced with plain 2-D matmuls (:func:`fedmq.models.zoo.plain_matmuls`)
so the dense layers become FULLY_CONNECTED, converted with the converter's sparsity pass
(pruned float32 kernels stored in TFLite's sparse format, expanded by DENSIFY when the
model is loaded). Builtin ops only; the result is
loaded back in the LiteRT interpreter and its logits are compared with the dense float32
forward pass before it is kept.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.models.spec import ModelBundle, check_weights

__all__ = ["PrunedExport", "export_pruned", "load_weights_npz"]


@dataclass(frozen=True)
class PrunedExport:
    path: Path
    tflite_bytes: int
    bundle_tflite_bytes: int
    zlib_bytes: int  # what a generic compressor makes of it (e.g. a gzip'd download)
    sparsity: float  # fraction of the trainable weights that are exactly 0
    ops: list[str]
    max_logit_error: float  # vs the float32 dense forward pass, relative to max |logit|
    agreement: float  # fraction of random inputs with the same argmax as float32

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def load_weights_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Weights from an ``.npz`` (an aggregator model file ``models/vN.npz``, ``initial.npz``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from None


def export_pruned(
    bundle: ModelBundle, weights: Mapping[str, np.ndarray], out: str | os.PathLike[str]
) -> PrunedExport:
    """Write the compact inference model of ``bundle`` at ``weights`` (its trainable tensors;
    frozen ones come from the bundle) to ``out``; see the module docstring."""
    import tensorflow as tf

    from edge_agent.keras_trainer import config_from_spec
    from fedmq.models import zoo
    from fedmq.models.litert import flex_ops, interpreter_class, tflite_op_names

    spec = bundle.spec
    cfg = config_from_spec(spec)  # zoo bundles only: their forward pass is known
    given = check_weights(spec, weights, partial=True)
    missing = [n for n in spec.trainable if n not in given]
    if missing:
        raise ModelError(f"--weights lacks trainable tensors {missing}")
    full = {**{n: bundle.initial_weights[n] for n in spec.weight_names}, **given}
    module = tf.Module()
    module.consts = {n: tf.constant(v) for n, v in full.items()}
    x_spec = tf.TensorSpec([spec.infer_batch, *spec.input_shape], tf.float32, name="x")
    with zoo.plain_matmuls():
        module.infer = tf.function(lambda x: {"logits": zoo.forward(cfg, module.consts, x)},
                                   input_signature=[x_spec])
        concrete = module.infer.get_concrete_function()
    with tempfile.TemporaryDirectory(prefix="fedmq-pruned-") as tmp:
        tf.saved_model.save(module, tmp, signatures={"infer": concrete})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["infer"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        # Sparse float32 kernels (DENSIFY + FULLY_CONNECTED). With int8 weight-only
        # quantisation on top the sparse FULLY_CONNECTED fails to prepare in LiteRT's
        # default XNNPACK delegate (ai-edge-litert 2.3), so the weights stay float32.
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        try:
            tflite: bytes = converter.convert()
        except Exception as exc:  # ConverterError and friends
            detail = " ".join(str(exc).split())[:500]
            raise ModelError(f"pruned model does not convert: {detail}") from None
    ops = tflite_op_names(tflite)
    if flex_ops(ops):
        raise ModelError(f"pruned model needs non-builtin ops {flex_ops(ops)}")
    # Check it where it will run: LiteRT, against the float32 forward pass in TensorFlow.
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (spec.infer_batch, *spec.input_shape)).astype(np.float32)
    want = concrete(tf.constant(x))["logits"].numpy()
    with tempfile.TemporaryDirectory(prefix="fedmq-pruned-") as tmp:
        probe = Path(tmp) / "m.tflite"
        probe.write_bytes(tflite)
        interp = interpreter_class()(model_path=str(probe), num_threads=1)
        got = np.asarray(interp.get_signature_runner("infer")(x=x)["logits"])
    err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(tflite)
    total = sum(int(np.asarray(full[n]).size) for n in spec.trainable)
    zeros = sum(int(np.count_nonzero(np.asarray(full[n]) == 0)) for n in spec.trainable)
    return PrunedExport(
        path=out_path, tflite_bytes=len(tflite),
        bundle_tflite_bytes=bundle.tflite_path.stat().st_size,
        zlib_bytes=len(zlib.compress(tflite, 9)), sparsity=zeros / total if total else 0.0,
        ops=ops, max_logit_error=err, agreement=agree,
    )
