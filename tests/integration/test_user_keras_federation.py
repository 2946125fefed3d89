"""A model author's own Keras model (not from the zoo), exported with `fedmq model export
--keras`, federated by real aggregator and agent processes through Mosquitto."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedmq.models.spec import load_bundle
from fedmq.net.localbroker import LocalBroker
from fedmq_ops.localfleet import FederationSpec, run_federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _user_model(path: Path) -> None:
    """A small digits CNN of the kind a team writes itself: Reshape, Conv2D, pooling,
    BatchNormalization, Dropout, Dense, softmax output."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            layers.Reshape((8, 8, 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
            layers.MaxPooling2D(2, name="pool"),
            layers.BatchNormalization(name="norm"),
            layers.Flatten(),
            layers.Dropout(0.1),
            layers.Dense(32, activation="relu", name="hidden"),
            layers.Dense(10, activation="softmax", name="head"),
        ],
        name="team_digits_cnn",
    )
    model.save(path)


def test_a_user_keras_model_is_exported_and_federated(
    broker: LocalBroker, tmp_path: Path
) -> None:
    keras_file = tmp_path / "team.keras"
    _user_model(keras_file)
    bundle_dir = tmp_path / "bundle"
    export = subprocess.run(
        [sys.executable, "-m", "fedmq_ops", "model", "export", "--keras", str(keras_file),
         "--out", str(bundle_dir)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    bundle = load_bundle(bundle_dir)
    assert bundle.spec.name == "team_digits_cnn"
    federated = {t.name for t in bundle.spec.trainable_specs}
    assert {"conv_kernel", "hidden_kernel", "head_kernel"} <= federated

    result = run_federation(
        FederationSpec(
            agents=3, rounds=5, dataset="digits", model=str(bundle_dir),
            partition="dirichlet:0.5", codec="int8", epochs=2, lr=0.05, seed=2,
            broker=f"{broker.host}:{broker.port}", fleet=f"keras-{uuid.uuid4().hex[:8]}",
            workdir=tmp_path / "fed", timeout=300,
        )
    )  # fmt: skip
    rows = result.rows
    accuracies = [round(r.accuracy, 3) for r in rows]
    print(f"\nuser Keras model federated: accuracy per round {accuracies}")
    assert [r.version for r in rows] == [1, 2, 3, 4, 5]
    assert all(r.participants == 3 for r in rows)
    # Far above chance (10 %) and learning over the rounds.
    assert rows[-1].accuracy > 0.5 and rows[-1].accuracy > rows[0].accuracy, accuracies
