"""Export a zoo model as an on-device-trainable bundle (needs TensorFlow).

The SavedModel gets four signatures of fixed batch size: ``train(x, y, w, lr) -> {loss}``,
``infer(x) -> {logits}``, ``get_weights() -> {name: tensor}`` and
``set_weights(**{name: tensor}) -> {ok}``. It is converted with resource variables enabled and
ONLY ``TFLITE_BUILTINS``: if any op would need the Flex delegate the export fails. A module
with the optional signatures of :mod:`fedmq.models.variants` (``set_global``, ``train_prox``,
``gradient``) has them exported too.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.models.spec import ModelBundle, ModelSpec, check_weights, save_bundle
from fedmq.models.variants import VARIANT_SIGNATURES
from fedmq.models.zoo import ModelConfig, build_module, init_weights, preset

__all__ = ["SIGNATURES", "check_tflite_ops", "convert_module", "export_model", "resolve_config"]

log = logging.getLogger(__name__)

SIGNATURES = ("train", "infer", "get_weights", "set_weights")


def resolve_config(model: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A preset name or a config, with ``None``-valued overrides ignored."""
    if isinstance(model, ModelConfig):
        changes = {k: v for k, v in overrides.items() if v is not None}
        return model.replace(**changes) if changes else model
    return preset(model, **overrides)


def convert_module(module: Any, *, saved_model_dir: str | os.PathLike[str] | None = None) -> bytes:
    """SavedModel -> ``.tflite`` bytes with builtin ops only (raises ModelError otherwise)."""
    import tensorflow as tf

    keys = [*SIGNATURES, *(k for k in VARIANT_SIGNATURES if hasattr(module, k))]
    signatures = {key: getattr(module, key).get_concrete_function() for key in keys}
    with tempfile.TemporaryDirectory(prefix="fedmq-export-") as tmp:
        sm_dir = str(saved_model_dir) if saved_model_dir is not None else tmp
        tf.saved_model.save(module, sm_dir, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            sm_dir, signature_keys=keys
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            tflite: bytes = converter.convert()
        except Exception as exc:  # ConverterError and friends: keep the first lines
            detail = " ".join(str(exc).split())[:2000]
            raise ModelError(
                f"model does not convert to TFLite builtin ops (Flex would be needed?): {detail}"
            ) from exc
    return tflite


def check_tflite_ops(tflite: bytes, spec: ModelSpec) -> list[str]:
    """The op names of ``tflite``; raises ModelError if any is not a builtin."""
    from fedmq.models.litert import flex_ops, tflite_op_names

    ops = tflite_op_names(tflite)
    bad = flex_ops(ops)
    if bad:
        raise ModelError(f"exported model needs non-builtin ops {bad}")
    return ops


def export_model(
    model: str | ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    seed: int | None = None,
    head_only: bool | None = None,
    hidden: tuple[int, ...] | None = None,
    train_batch: int | None = None,
    infer_batch: int | None = None,
    initial_weights: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    saved_model_dir: str | os.PathLike[str] | None = None,
) -> ModelBundle:
    """Build, convert and save a bundle for a preset name or a :class:`ModelConfig`.

    ``initial_weights`` (a mapping or an ``.npz`` path, e.g. a pretrained feature extractor
    for ``head_only`` fine-tuning) may cover any subset of the weights; the rest are
    initialised deterministically from ``seed``.
    """
    import tensorflow as tf

    cfg = resolve_config(
        model,
        seed=seed,
        head_only=head_only,
        hidden=tuple(hidden) if hidden is not None else None,
        train_batch=train_batch,
        infer_batch=infer_batch,
    )
    spec = cfg.to_spec()
    weights = init_weights(cfg)
    if initial_weights is not None:
        if isinstance(initial_weights, Mapping):
            given = dict(initial_weights)
        else:
            with np.load(initial_weights, allow_pickle=False) as npz:
                given = {k: npz[k] for k in npz.files}
        weights.update(check_weights(spec, given, partial=True))
    module = build_module(cfg, weights)
    tflite = convert_module(module, saved_model_dir=saved_model_dir)
    ops = check_tflite_ops(tflite, spec)
    spec = ModelSpec.from_json(
        {
            **spec.to_json(),
            "extra": {
                **spec.extra,
                "exported_with": f"tensorflow {tf.__version__}",
                "ops": ops,
            },
        }
    )
    bundle = save_bundle(Path(out_dir), spec, tflite, weights)
    log.info(
        "exported %s (%s, %d params, %d trainable) to %s: %d bytes, builtin ops only",
        spec.name,
        spec.kind,
        spec.num_params,
        spec.num_trainable_params,
        out_dir,
        len(tflite),
    )
    return bundle
