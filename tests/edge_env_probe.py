"""Probe run INSIDE an edge-only virtual environment (no TensorFlow) by
``tests/integration/test_edge_only_env.py``; it prints one JSON object on stdout.

It imports only what a device has (fedmq as installed in that venv, numpy, the LiteRT
runtime), loads a model bundle with :class:`edge_agent.trainer.LiteRTTrainer`, sets the
initial weights, trains a short real run on Fashion-MNIST and reports: runtime name and
version, numpy version, loss / accuracy on a held-out slice before and after, training
examples/s, peak RSS.

Data: the Fashion-MNIST *test* IDX files (10,000 examples) are read with ``fedmq.data``
and split into a training slice (the first ``--train`` examples) and a disjoint held-out
slice (the last ``--eval`` examples). The 60,000-example train file is not read so that
decompressing it does not dominate the peak RSS, which is meant to show the runtime + model.

Usage: ``python -I edge_env_probe.py --bundle DIR|prebuilt:NAME [--train N] [--eval N]``.
Exit status 0 with JSON; 3 with ``{"skip": reason}`` when the dataset is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

FASHION_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
EXIT_SKIP = 3


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux), or -1."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return -1.0


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: the latter keeps the spawning pytest process's peak across exec.
    from fedmq.memory import peak_rss_mb

    return peak_rss_mb()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="bundle directory or prebuilt:NAME")
    ap.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "tensorflow_importable": importlib.util.find_spec("tensorflow") is not None,
        "tensorflow_dist": _version("tensorflow") or _version("tensorflow-cpu"),
    }
    t0 = time.perf_counter()
    import numpy as np

    import fedmq
    from edge_agent.trainer import LiteRTTrainer
    from fedmq.data import Dataset, read_idx, reshape_layout
    from fedmq.models import litert as runtime
    from fedmq.models.spec import load_bundle, prebuilt_bundle_path

    report["fedmq_file"] = str(Path(fedmq.__file__).resolve())
    report["numpy_version"] = np.__version__
    report["runtime_name"] = runtime.runtime_name()
    report["runtime_version"] = runtime.runtime_version()
    report["env_runtime_override"] = os.environ.get("FEDMQ_TFLITE_RUNTIME", "")
    report["import_seconds"] = round(time.perf_counter() - t0, 3)
    report["rss_after_imports_mb"] = round(_rss_mb("VmRSS"), 1)
    # Importing the runtime must not have dragged TensorFlow in.
    report["tensorflow_loaded"] = "tensorflow" in sys.modules

    root = Path(args.data_root)
    missing = [f for f in FASHION_TEST if not (root / f).is_file()]
    if missing:
        report["skip"] = f"Fashion-MNIST not found in {root} (missing {', '.join(missing)})"
        print(json.dumps(report))
        return EXIT_SKIP

    if args.bundle.startswith("prebuilt:"):
        bundle_dir = prebuilt_bundle_path(args.bundle.split(":", 1)[1])
    else:
        bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir)
    spec = bundle.spec
    report["model"] = spec.name
    report["bundle"] = str(bundle_dir)
    report["exported_with"] = spec.extra.get("exported_with")
    report["params"] = spec.num_params

    # -- data: disjoint train / held-out slices of the 10k test split -------------------------
    images = read_idx(root / FASHION_TEST[0])
    labels = read_idx(root / FASHION_TEST[1])
    n_train, n_eval = args.train, args.eval
    if n_train + n_eval > len(images):
        raise SystemExit(f"--train + --eval must be <= {len(images)}")
    layout = {4: "images", 3: "sequences", 2: "flat"}[1 + len(spec.input_shape)]

    def as_dataset(pixels: np.ndarray, ys: np.ndarray, name: str) -> Dataset:
        x = pixels.astype(np.float32)
        x /= np.float32(255.0)
        return Dataset.from_arrays(
            reshape_layout(x, layout), ys.astype(np.int32), num_classes=10, name=name
        )

    train = as_dataset(images[:n_train], labels[:n_train], "train")
    held = as_dataset(images[len(images) - n_eval :], labels[len(images) - n_eval :], "held-out")
    del images, labels
    report["examples_train"] = len(train.y)
    report["examples_eval"] = len(held.y)
    report["rss_after_data_mb"] = round(_rss_mb("VmRSS"), 1)
    report["peak_rss_before_model_mb"] = round(_peak_rss_mb(), 1)

    # -- model --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    trainer = LiteRTTrainer(bundle, num_threads=args.threads)
    trainer.set_weights(bundle.initial_trainable())
    report["load_seconds"] = round(time.perf_counter() - t0, 3)
    report["num_threads"] = trainer.model.num_threads
    report["trainer_runtime"] = trainer.runtime_name

    before = trainer.evaluate(held.x, held.y)
    fit = trainer.fit(
        train.x, train.y, epochs=args.epochs, lr=args.lr, rng=np.random.default_rng(args.seed)
    )
    after = trainer.evaluate(held.x, held.y)
    weights = trainer.get_weights()

    report.update(
        loss_before=before.loss,
        loss_after=after.loss,
        accuracy_before=before.accuracy,
        accuracy_after=after.accuracy,
        train_loss=fit.loss,
        train_steps=fit.steps,
        train_seconds=round(fit.seconds, 3),
        examples_per_second=round(fit.examples_per_second, 1),
        weights_finite=bool(all(np.isfinite(w).all() for w in weights.values())),
        weights_changed=bool(
            any(not np.array_equal(weights[n], bundle.initial_weights[n]) for n in spec.trainable)
        ),
        rss_end_mb=round(_rss_mb("VmRSS"), 1),
        peak_rss_mb=round(_peak_rss_mb(), 1),
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
