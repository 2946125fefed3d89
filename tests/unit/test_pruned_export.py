"""``fedmq model export --pruned``: a compact inference-only model of a pruned model that
LiteRT runs with the float32 forward pass's logits (needs TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.errors import ConfigError
from fedmq.models import load_bundle, prebuilt_bundle_path
from fedmq.models.litert import flex_ops, interpreter_class, tflite_op_names
from fedmq.prune.mask import magnitude_mask
from fedmq.prune.strategy import prunable_tensors
from fedmq_ops.cli import build_parser

tf = pytest.importorskip("tensorflow")


def test_pruned_export_is_compact_and_predicts_like_the_float_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    spec = bundle.spec
    shapes = {t.name: t.shape for t in spec.weights}
    weights = {n: bundle.initial_weights[n] for n in spec.trainable}
    mask = magnitude_mask(weights, 0.8, prunable_tensors(shapes))
    np.savez(tmp_path / "v8.npz", **mask.apply(weights))
    out = tmp_path / "digits-pruned.tflite"
    args = build_parser().parse_args(["model", "export", "--pruned", "digits-mlp",
                                      "--weights", str(tmp_path / "v8.npz"), "--out", str(out)])
    assert args.func(args) == 0
    line = capsys.readouterr().out
    # 80 % of the kernels pruned; the initial biases are zeros too
    assert "same class 100.0 %" in line and "80.3 % of the weights are zero" in line
    data = out.read_bytes()
    ops = tflite_op_names(data)
    assert flex_ops(ops) == [] and "DENSIFY" in ops  # kernels stored sparse
    # dense float32 kernels alone are 4,736 x 4 = 18,944 bytes
    assert len(data) < 8_000 < bundle.tflite_path.stat().st_size
    # LiteRT logits equal numpy's forward pass of the pruned weights
    pruned = mask.apply(weights)
    x = np.random.default_rng(1).uniform(0, 16, (spec.infer_batch, 64)).astype(np.float32)
    want = np.maximum(x @ pruned["dense1_kernel"] + pruned["dense1_bias"], 0)
    want = want @ pruned["out_kernel"] + pruned["out_bias"]
    interp = interpreter_class()(model_path=str(out), num_threads=1)
    got = interp.get_signature_runner("infer")(x=x)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_pruned_export_needs_weights(tmp_path: Path) -> None:
    args = build_parser().parse_args(["model", "export", "--pruned", "digits-mlp",
                                      "--out", str(tmp_path / "x.tflite")])
    with pytest.raises(ConfigError, match="--weights"):
        args.func(args)
