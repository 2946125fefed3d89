"""The bundles shipped in fedmq/models/prebuilt/: they load, use builtin ops only, and are
what a fresh ``fedmq model export`` of their preset produces (spec, initial weights, and
with TensorFlow the same training step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.models import load_bundle, prebuilt_bundle_path, prebuilt_names
from fedmq.models.litert import TFLiteModel, flex_ops, tflite_op_names
from fedmq.models.spec import ModelBundle
from fedmq.models.zoo import PRESETS, init_weights, preset

NAMES = prebuilt_names()


def test_expected_bundles_are_shipped() -> None:
    assert {"digits-mlp", "fmnist-cnn", "fmnist-lstm"} <= set(NAMES)
    for name in ("fmnist-cnn", "fmnist-lstm"):
        path = prebuilt_bundle_path(name)
        assert path == Path(__file__).resolve().parents[2] / "fedmq/models/prebuilt" / name


def _config_of(bundle: ModelBundle) -> dict[str, object]:
    cfg = bundle.spec.extra["config"]
    assert isinstance(cfg, dict)
    return cfg


@pytest.mark.parametrize("name", NAMES)
def test_prebuilt_loads_builtin_only_and_matches_its_preset(name: str) -> None:
    bundle = load_bundle(prebuilt_bundle_path(name))
    assert bundle.spec.name == name
    ops = tflite_op_names(bundle.tflite_path)
    assert flex_ops(ops) == [], ops
    assert bundle.spec.extra.get("ops") == ops
    # spec and initial weights are the preset's (no TensorFlow needed to check)
    assert name in PRESETS
    cfg = preset(name, seed=int(_config_of(bundle)["seed"]))  # type: ignore[call-overload]
    expected = cfg.to_spec()
    assert bundle.spec.weights == expected.weights
    assert bundle.spec.trainable == expected.trainable
    assert bundle.spec.input_shape == expected.input_shape
    assert (bundle.spec.train_batch, bundle.spec.infer_batch) == (
        expected.train_batch,
        expected.infer_batch,
    )
    assert _config_of(bundle) == expected.extra["config"]
    for n, value in init_weights(cfg).items():
        np.testing.assert_array_equal(bundle.initial_weights[n], value, err_msg=n)
    model = TFLiteModel(bundle, num_threads=1)
    x = np.zeros((3, *bundle.spec.input_shape), np.float32)
    assert model.predict(x).shape == (3, bundle.spec.num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_prebuilt_matches_a_fresh_export(name: str, tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    from fedmq.models.export import export_model

    shipped = load_bundle(prebuilt_bundle_path(name))
    seed = int(_config_of(shipped)["seed"])  # type: ignore[call-overload]
    fresh = export_model(name, tmp_path / name, seed=seed)
    a, b = shipped.spec.to_json(), fresh.spec.to_json()
    if shipped.spec.extra.get("exported_with") != f"tensorflow {tf.__version__}":
        for spec_json in (a, b):  # another converter may pick other ops; behaviour must agree
            spec_json["extra"] = {k: v for k, v in spec_json["extra"].items()
                                  if k not in ("exported_with", "ops")}
    assert a == b
    for n in shipped.spec.weight_names:
        np.testing.assert_array_equal(shipped.initial_weights[n], fresh.initial_weights[n])
    # the same training step and inference
    spec = shipped.spec
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(spec.train_batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=spec.train_batch).astype(np.int32)
    w = np.ones(spec.train_batch, np.float32)
    models = [TFLiteModel(shipped, num_threads=1), TFLiteModel(fresh, num_threads=1)]
    losses = [m.train_step(x, y, w, 0.05) for m in models]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    after = [m.get_weights() for m in models]
    for n in spec.trainable:
        np.testing.assert_allclose(after[0][n], after[1][n], atol=1e-6)
    np.testing.assert_allclose(models[0].predict(x), models[1].predict(x), atol=1e-5)
