"""Model bundles (pure) and, in submodules, the zoo and exporter (TensorFlow).

``fedmq.models`` itself imports no TensorFlow: devices load bundles with it.
"""

from fedmq.models.spec import (
    ModelBundle,
    ModelSpec,
    TensorSpec,
    load_bundle,
    prebuilt_bundle_path,
    prebuilt_names,
    save_bundle,
)

__all__ = [
    "ModelBundle",
    "ModelSpec",
    "TensorSpec",
    "load_bundle",
    "prebuilt_bundle_path",
    "prebuilt_names",
    "save_bundle",
]
