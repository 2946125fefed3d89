"""The model bundle the aggregator serves: where it comes from and how it is named."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedmq.models.spec import ModelBundle, load_bundle, prebuilt_bundle_path

__all__ = ["content_digest", "model_id_of", "resolve_bundle"]


def resolve_bundle(model: str) -> ModelBundle:
    """A bundle directory, or the name of a bundle shipped with fedmq."""
    path = Path(model).expanduser()
    if path.exists():
        return load_bundle(path)
    return load_bundle(prebuilt_bundle_path(model))


def model_id_of(bundle: ModelBundle) -> str:
    return f"{bundle.spec.name}@{bundle.tflite_sha256()[:16]}"


def content_digest(weights: Mapping[str, np.ndarray]) -> str:
    """A short digest of weights (log lines, tests)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
