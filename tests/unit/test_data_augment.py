"""Augmentation: changes data, keeps shape/range, deterministic, never in place."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.data.augment import AugmentConfig, augment_images, augment_series, make_augmenter
from fedmq.errors import DataError


def _images(n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((n, 8, 8, 1), np.float32)
    x[:, 2:6, 3:5, 0] = rng.uniform(0.5, 1.0, size=(n, 4, 2))
    return x


def test_parse_compact_strings_and_mappings() -> None:
    cfg = AugmentConfig.parse("shift=2,flip=0,noise=0.05")
    assert cfg == AugmentConfig(shift=2, flip=False, noise=0.05)
    assert cfg.image_ops and not cfg.series_ops
    series = AugmentConfig.parse("jitter=0.03,scale=0.1,warp=0.2")
    assert (series.jitter, series.scale, series.warp) == (0.03, 0.1, 0.2)
    assert AugmentConfig.parse({"flip": "yes", "shift": 1}).flip is True
    assert not AugmentConfig.parse(None).enabled and not AugmentConfig.parse("none").enabled
    assert AugmentConfig.parse(str(cfg)) == cfg
    assert str(AugmentConfig()) == "none"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rotate=10", "unknown augment option"),
        ("shift=1.5", "not a valid value"),
        ("noise=-0.1", ">= 0"),
        ("warp=1.2", "< 1"),
        ("flip=maybe", "not a valid value"),
        ("shift", "expected key=value"),
        ("shift=1,shift=2", "twice"),
    ],
)
def test_parse_rejects(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        AugmentConfig.parse(spec)


def test_images_change_keep_shape_range_and_input() -> None:
    x = _images()
    before = x.copy()
    cfg = AugmentConfig(shift=2, noise=0.1)
    out = augment_images(x, np.random.default_rng(1), cfg)
    np.testing.assert_array_equal(x, before)
    assert out.shape == x.shape and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert np.abs(out - x).mean() > 0.01
    again = augment_images(x, np.random.default_rng(1), cfg)
    np.testing.assert_array_equal(out, again)
    other = augment_images(x, np.random.default_rng(2), cfg)
    assert not np.array_equal(out, other)


def test_shift_moves_content_with_zero_fill() -> None:
    x = np.zeros((200, 5, 5), np.float32)
    x[:, 2, 2] = 1.0
    out = augment_images(x, np.random.default_rng(3), AugmentConfig(shift=1))
    # the single bright pixel survives (shift 1 never leaves a 5x5 frame) and moves
    assert np.all(out.reshape(200, -1).sum(axis=1) == 1.0)
    rows, cols = np.nonzero(out.reshape(200, 5, 5).max(axis=0))
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    centre = out[:, 2, 2].mean()
    assert 0.05 < centre < 0.25  # about 1/9 stay put


def test_flip_is_off_by_default_and_mirrors_when_on() -> None:
    x = np.zeros((64, 4, 4, 1), np.float32)
    x[:, :, 0, 0] = 1.0  # left column lit
    assert np.array_equal(make_augmenter("noise=0", "images")(x, np.random.default_rng(0)), x)
    out = augment_images(x, np.random.default_rng(0), AugmentConfig(flip=True))
    flipped = out[:, :, 3, 0].max(axis=1) == 1.0
    kept = out[:, :, 0, 0].max(axis=1) == 1.0
    assert np.all(flipped ^ kept) and 10 < flipped.sum() < 54


def test_flat_images_need_shape() -> None:
    x = _images().reshape(16, 64)
    aug = make_augmenter("shift=1", "flat")
    out = aug(x, np.random.default_rng(0))
    assert out.shape == (16, 64) and not np.array_equal(out, x)
    with pytest.raises(DataError, match="image_shape"):
        augment_images(x, np.random.default_rng(0), AugmentConfig(shift=1))
    with pytest.raises(DataError, match="cannot infer"):
        make_augmenter("shift=1", "flat")(np.zeros((2, 10), np.float32), np.random.default_rng(0))


def test_series_ops_change_keep_shape_deterministic() -> None:
    t = np.linspace(0, 4 * np.pi, 50, dtype=np.float32)
    x = np.stack([np.stack([np.sin(t), np.cos(t), t / 10], axis=1)] * 8)  # (8, 50, 3)
    before = x.copy()
    for spec in ("jitter=0.05", "scale=0.2", "warp=0.3"):
        cfg = AugmentConfig.parse(spec)
        out = augment_series(x, np.random.default_rng(4), cfg)
        np.testing.assert_array_equal(x, before)
        assert out.shape == x.shape and out.dtype == np.float32
        assert np.abs(out - x).mean() > 1e-3, spec
        np.testing.assert_array_equal(out, augment_series(x, np.random.default_rng(4), cfg))
    warped = augment_series(x, np.random.default_rng(5), AugmentConfig(warp=0.3))
    # warping reorders time smoothly: endpoints fixed, values stay within the original range
    np.testing.assert_allclose(warped[:, [0, -1]], x[:, [0, -1]], atol=1e-5)
    assert warped.min() >= x.min() - 1e-5 and warped.max() <= x.max() + 1e-5
    # magnitude scaling multiplies each (example, feature) by one factor
    scaled = augment_series(x, np.random.default_rng(6), AugmentConfig(scale=0.2))
    ratio = scaled[:, 5:, 2] / x[:, 5:, 2]
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(ratio.shape[1], axis=1), rtol=1e-5)


def test_make_augmenter_layout_rules() -> None:
    with pytest.raises(DataError, match="sequence data"):
        make_augmenter("jitter=0.1", "images")
    with pytest.raises(DataError, match="image options"):
        make_augmenter("shift=1", "series")
    seq = np.random.default_rng(0).uniform(0, 1, (4, 28, 28)).astype(np.float32)
    out = make_augmenter("shift=1,jitter=0.2", "sequences")(seq, np.random.default_rng(0))
    assert out.shape == seq.shape and out.min() >= 0.0 and out.max() <= 1.0
    series = np.full((2, 10, 3), 5.0, np.float32)
    out = make_augmenter("jitter=0.1", "series")(series, np.random.default_rng(0))
    assert out.max() > 5.0  # sensor series are not clipped to [0, 1]
