"""ModelSpec / TensorSpec validation, JSON round trip and bundle files (pure, no TensorFlow)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import ModelError
from fedmq.models import (
    ModelSpec,
    TensorSpec,
    load_bundle,
    prebuilt_bundle_path,
    prebuilt_names,
    save_bundle,
)
from fedmq.models.spec import check_weights


def make_spec(**changes: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "tiny-mlp",
        "kind": "mlp",
        "input_shape": (4,),
        "input_dtype": "float32",
        "num_classes": 3,
        "train_batch": 8,
        "infer_batch": 16,
        "weights": (
            TensorSpec("dense1_kernel", (4, 5)),
            TensorSpec("dense1_bias", (5,)),
            TensorSpec("out_kernel", (5, 3)),
            TensorSpec("out_bias", (3,)),
        ),
        "trainable": ("out_bias", "out_kernel"),
        "extra": {"note": "x"},
    }
    fields.update(changes)
    return ModelSpec(**fields)


def weights_for(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.normal(size=t.shape).astype(np.float32) for t in spec.weights}


def test_json_round_trip_and_derived_fields() -> None:
    spec = make_spec()
    again = ModelSpec.loads(spec.dumps())
    assert again == spec
    assert json.loads(spec.dumps())["format"] == 1
    # trainable is kept in canonical (weights) order
    assert spec.trainable == ("out_kernel", "out_bias")
    assert spec.frozen == ("dense1_kernel", "dense1_bias")
    assert spec.num_params == 4 * 5 + 5 + 5 * 3 + 3
    assert spec.num_trainable_params == 18
    assert spec.weight("out_bias").shape == (3,)
    with pytest.raises(ModelError, match="no weight"):
        spec.weight("nope")


def test_lists_are_normalised_to_tuples() -> None:
    # JSON and callers hand in lists: they are normalised (hence the ignores)
    weights = [TensorSpec("out_kernel", [4, 3])]  # type: ignore[arg-type]
    spec = make_spec(input_shape=[2, 2], weights=weights, trainable=["out_kernel"])
    spec = dataclasses.replace(spec, input_shape=[4])  # type: ignore[arg-type]
    assert spec.input_shape == (4,)
    spec = dataclasses.replace(spec, input_shape=[2, 2])  # type: ignore[arg-type]
    assert spec.input_shape == (2, 2)
    assert spec.weights[0].shape == (4, 3)
    assert spec.trainable == ("out_kernel",)


@given(
    shapes=st.lists(st.lists(st.integers(1, 9), max_size=4), min_size=1, max_size=6),
    classes=st.integers(2, 1000),
    batch=st.integers(1, 512),
)
def test_round_trip_property(shapes: list[list[int]], classes: int, batch: int) -> None:
    weights = tuple(TensorSpec(f"w{i}", tuple(s)) for i, s in enumerate(shapes))
    spec = make_spec(
        weights=weights, trainable=(weights[-1].name,), num_classes=classes, train_batch=batch
    )
    assert ModelSpec.loads(spec.dumps()) == spec


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": ""}, "model name"),
        ({"name": "a/b"}, "model name"),
        ({"kind": ""}, "kind"),
        ({"input_shape": ()}, "input_shape"),
        ({"input_shape": (0,)}, "input_shape"),
        ({"input_shape": (2.5,)}, "input_shape"),
        ({"input_dtype": "int8"}, "input_dtype"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"train_batch": 0}, "train_batch"),
        ({"infer_batch": -1}, "infer_batch"),
        ({"weights": ()}, "weights"),
        ({"weights": (TensorSpec("a", (1,)), TensorSpec("a", (2,)))}, "duplicate"),
        ({"trainable": ()}, "trainable"),
        ({"trainable": "out_bias"}, "not a string"),
        ({"trainable": ("nope",)}, "not weights"),
        ({"trainable": ("out_bias", "out_bias")}, "unique"),
        ({"extra": {"x": object()}}, "JSON"),
    ],
)
def test_spec_validation(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        make_spec(**changes)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("Bad-Name", (1,)), "tensor name"),
        (("w", (0,)), "shape"),
        (("w", "12"), "shape"),
        (("w", (2,), "float64"), "dtype"),
    ],
)
def test_tensor_spec_validation(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        TensorSpec(*args)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("weights"), "missing"),
        (lambda d: d.update(surprise=1), "unknown fields"),
        (lambda d: d.update(format=99), "format"),
        (lambda d: d["weights"][0].update(shape=[-1]), "shape"),
        (lambda d: d["weights"][0].pop("name"), "name"),
        (lambda d: d.update(trainable="out_bias"), "trainable"),
    ],
)
def test_from_json_rejects(mutate: Any, match: str) -> None:
    doc = make_spec().to_json()
    mutate(doc)
    with pytest.raises(ModelError, match=match):
        ModelSpec.from_json(doc)


def test_loads_rejects_garbage() -> None:
    with pytest.raises(ModelError, match="JSON"):
        ModelSpec.loads("{nope")
    with pytest.raises(ModelError, match="object"):
        ModelSpec.loads("[1, 2]")


def test_check_weights() -> None:
    spec = make_spec()
    good = weights_for(spec)
    out = check_weights(spec, good)
    assert out.keys() == good.keys()
    assert out["out_bias"] is not good["out_bias"]
    assert check_weights(spec, {"out_bias": good["out_bias"]}, partial=True).keys() == {"out_bias"}
    with pytest.raises(ModelError, match="missing"):
        check_weights(spec, {"out_bias": good["out_bias"]})
    with pytest.raises(ModelError, match="shape"):
        check_weights(spec, {**good, "out_bias": np.zeros(4, np.float32)})


def test_bundle_save_load(tmp_path: Path) -> None:
    spec = make_spec()
    weights = weights_for(spec)
    bundle = save_bundle(tmp_path / "b", spec, b"TFL3-not-really", weights)
    again = load_bundle(tmp_path / "b" / "spec.json")
    assert again.spec == spec
    assert again.path == tmp_path / "b"
    assert again.tflite_bytes() == b"TFL3-not-really"
    assert len(again.tflite_sha256()) == 64
    for name, value in weights.items():
        np.testing.assert_array_equal(again.initial_weights[name], value)
    assert list(bundle.initial_trainable()) == ["out_kernel", "out_bias"]
    if sys.platform != "win32":
        assert (tmp_path / "b" / "spec.json").stat().st_mode & 0o777 == 0o644


def test_bundle_errors(tmp_path: Path) -> None:
    spec = make_spec()
    with pytest.raises(ModelError, match="not a directory"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(ModelError, match="empty"):
        save_bundle(tmp_path / "e", spec, b"", weights_for(spec))
    with pytest.raises(ModelError, match="missing"):
        save_bundle(tmp_path / "m", spec, b"x", {"out_bias": np.zeros(3, np.float32)})
    save_bundle(tmp_path / "b", spec, b"x", weights_for(spec))
    bad = weights_for(spec)
    bad["out_bias"] = np.zeros(7, np.float32)
    savez: Any = np.savez
    savez(tmp_path / "b" / "initial.npz", **bad)
    with pytest.raises(ModelError, match="shape"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "initial.npz").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.tflite").unlink()
    with pytest.raises(ModelError, match=r"model\.tflite"):
        load_bundle(tmp_path / "b")


def test_prebuilt_bundle() -> None:
    assert "digits-mlp" in prebuilt_names()
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    assert bundle.spec.input_shape == (64,)
    assert bundle.spec.num_classes == 10
    assert bundle.spec.train_batch == 16
    assert bundle.tflite_path.stat().st_size < 200_000
    with pytest.raises(ModelError, match="no prebuilt model"):
        prebuilt_bundle_path("imagenet-vit")
    with pytest.raises(ModelError, match="invalid"):
        prebuilt_bundle_path("../etc")


def test_spec_module_does_not_import_tensorflow() -> None:
    import subprocess

    code = (
        "import sys, fedmq.models, fedmq.models.spec, fedmq.models.litert, edge_agent.trainer;"
        "sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
