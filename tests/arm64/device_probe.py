"""Probe run INSIDE the arm64 root (aarch64 Python under qemu-user) by
``tests/integration/test_arm64_install.py``; it prints one JSON object on stdout.

It imports only what the device install has (fedmq from its wheel, numpy, the LiteRT runtime
of the installed extra) and uses the device code:

- ``update --out FILE``: builds a deterministic delta, encodes it with the ``int8`` codec
  (``fedmq.update.codecs.encode_delta``), signs the :class:`~fedmq.wire.UpdateMessage` with a
  :class:`~fedmq.signing.DeviceKey` (``sign_update``) and writes the payload to FILE. Reports
  the public key, the delta and the values the device itself decodes, as little-endian
  float32 hex, so the x86_64 host can compare its aggregator's decoding bit for bit.
- ``train --bundle NAME --data NPZ``: trains the prebuilt bundle NAME with
  :class:`edge_agent.trainer.LiteRTTrainer` (runtime from ``FEDMQ_TFLITE_RUNTIME``) on the
  NPZ's ``x_train``/``y_train`` and reports the held-out loss (``x_eval``/``y_eval``) before
  and after, and the training loss of each epoch.

Usage: ``python -I device_probe.py update --out FILE`` or
``python -I device_probe.py train --bundle NAME --data NPZ [--epochs N] [--lr LR]``
(fedmq's own signature call never resizes a 0-d input: the ai-edge-litert aarch64 crash).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

SEED = bytes(range(32))  # the device key: fixed, so the host knows whom to expect
SHAPES = {"dense_kernel": (16, 8), "dense_bias": (8,), "out_kernel": (8, 3)}
NUM_EXAMPLES = 64  # a power of two: the host's weighted mean of one update is exact


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _common() -> dict[str, Any]:
    import numpy as np

    import fedmq

    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "fedmq_file": str(Path(fedmq.__file__).resolve()),
        "tensorflow_installed": _dist("tensorflow") or _dist("tensorflow-cpu"),
    }


def cmd_update(out: Path) -> dict[str, Any]:
    import numpy as np

    from fedmq.signing import DeviceKey, sign_update
    from fedmq.update.codecs import decode_tensors, encode_delta
    from fedmq.wire import UpdateMessage

    rng = np.random.default_rng(7)
    delta = {
        name: (rng.standard_normal(shape) * 0.01).astype(np.float32)
        for name, shape in SHAPES.items()
    }
    tensors = encode_delta(delta, "int8", np.random.default_rng(11))
    message = UpdateMessage(
        fleet="arm64",
        round_id=3,
        base_version=2,
        device="pi-1",
        update_id="arm64-probe-1",
        num_examples=NUM_EXAMPLES,
        codec="int8",
        tensors=tensors,
        metrics={"loss": 0.5},
        created_at=1_700_000_000.0,
    )
    key = DeviceKey.from_seed(SEED)
    payload = sign_update(message, key)
    out.write_bytes(payload)
    decoded = decode_tensors(tensors, "int8")
    report = _common()
    report.update(
        public_key=key.public_hex,
        payload_bytes=len(payload),
        num_examples=NUM_EXAMPLES,
        tensors={
            name: {
                "shape": list(delta[name].shape),
                "delta": delta[name].astype("<f4").tobytes().hex(),
                "decoded": decoded[name].astype("<f4").tobytes().hex(),
            }
            for name in SHAPES
        },
    )
    return report


def cmd_train(bundle_name: str, data: Path, epochs: int, lr: float) -> dict[str, Any]:
    import numpy as np

    from edge_agent.trainer import LiteRTTrainer
    from fedmq.models import litert
    from fedmq.models.spec import load_bundle, prebuilt_bundle_path

    arrays = np.load(data)
    bundle = load_bundle(prebuilt_bundle_path(bundle_name))
    trainer = LiteRTTrainer(bundle)
    trainer.set_weights(bundle.initial_trainable())
    before = trainer.evaluate(arrays["x_eval"], arrays["y_eval"])
    rng = np.random.default_rng(0)
    epoch_losses = []
    steps = 0
    for _ in range(epochs):
        fit = trainer.fit(arrays["x_train"], arrays["y_train"], epochs=1, lr=lr, rng=rng)
        epoch_losses.append(fit.loss)
        steps += fit.steps
    after = trainer.evaluate(arrays["x_eval"], arrays["y_eval"])
    weights = trainer.get_weights()
    report = _common()
    report.update(
        model=bundle.spec.name,
        runtime_name=trainer.runtime_name,
        runtime_version=litert.runtime_version(),
        num_threads=trainer.model.num_threads,
        examples_train=len(arrays["y_train"]),
        examples_eval=len(arrays["y_eval"]),
        steps=steps,
        epoch_losses=epoch_losses,
        loss_before=before.loss,
        loss_after=after.loss,
        accuracy_before=before.accuracy,
        accuracy_after=after.accuracy,
        weights_finite=bool(all(np.isfinite(w).all() for w in weights.values())),
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("update")
    up.add_argument("--out", type=Path, required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--bundle", required=True)
    tr.add_argument("--data", type=Path, required=True)
    tr.add_argument("--epochs", type=int, default=2)
    tr.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)
    if args.cmd == "update":
        report = cmd_update(args.out)
    else:
        report = cmd_train(args.bundle, args.data, args.epochs, args.lr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
