"""Cheap numpy data augmentation for on-device training rounds.

Images (N, H, W, C), (N, H, W) or flat (N, H*W*C) with a known image shape: random
integer shifts with zero fill, optional horizontal flips (off by default: a mirrored
digit is not the same digit), gaussian noise, result clipped to [0, 1].
Time series (N, T, F): jitter (additive gaussian noise), magnitude scaling (one random
factor per example and feature) and time warping (a smooth random speed curve,
resampled by linear interpolation).

All functions return new float32 arrays and never modify their input; given the same
``numpy.random.Generator`` state they return the same result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fedmq.errors import DataError

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "augment_images",
    "augment_series",
    "make_augmenter",
]

log = logging.getLogger(__name__)

Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_WARP_KNOTS = 4


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; all zero/off means no augmentation.

    Image options: ``shift`` (max pixels, int), ``flip`` (mirror half the images
    left-right), ``noise`` (gaussian std). Series options: ``jitter`` (gaussian std),
    ``scale`` (std of the per-feature magnitude factor around 1), ``warp`` (std of the
    time-warp speed knots around 1, < 1).
    """

    shift: int = 0
    flip: bool = False
    noise: float = 0.0
    jitter: float = 0.0
    scale: float = 0.0
    warp: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise DataError(f"augment shift must be a non-negative integer, got {self.shift!r}")
        if not isinstance(self.flip, bool):
            raise DataError(f"augment flip must be a bool, got {self.flip!r}")
        for name in ("noise", "jitter", "scale", "warp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DataError(f"augment {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise DataError(f"augment {name} must be finite and >= 0, got {value}")
            object.__setattr__(self, name, float(value))
        if self.warp >= 1.0:
            raise DataError(f"augment warp must be < 1, got {self.warp}")

    @property
    def image_ops(self) -> bool:
        return self.shift > 0 or self.flip or self.noise > 0

    @property
    def series_ops(self) -> bool:
        return self.jitter > 0 or self.scale > 0 or self.warp > 0

    @property
    def enabled(self) -> bool:
        return self.image_ops or self.series_ops

    @classmethod
    def parse(cls, spec: AugmentConfig | Mapping[str, Any] | str | None) -> AugmentConfig:
        """From ``None``, ``""``/``"none"``, a mapping, or ``"shift=2,flip=0,noise=0.05"``."""
        if spec is None:
            return cls()
        if isinstance(spec, AugmentConfig):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if text.lower() in ("", "none", "off"):
                return cls()
            items: dict[str, Any] = {}
            for item in text.split(","):
                key, sep, value = item.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise DataError(f"augment spec {spec!r}: expected key=value, got {item!r}")
                if key in items:
                    raise DataError(f"augment spec {spec!r}: {key} given twice")
                items[key] = value.strip()
            spec = items
        if not isinstance(spec, Mapping):
            raise DataError(f"augment config must be a string or mapping, got {type(spec)}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise DataError(
                f"unknown augment option(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in spec.items():
            kwargs[key] = _convert(key, value)
        return cls(**kwargs)

    def __str__(self) -> str:
        default = AugmentConfig()
        parts = [
            f"{k}={int(v) if isinstance(v, bool) else v}"
            for k, v in asdict(self).items()
            if v != getattr(default, k)
        ]
        return ",".join(parts) or "none"


def _convert(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        if key == "flip" and isinstance(value, int) and value in (0, 1):
            return bool(value)
        return value
    text = value.strip().lower()
    try:
        if key == "flip":
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(text)
        if key == "shift":
            return int(text)
        return float(text)
    except ValueError:
        raise DataError(f"augment option {key}={value!r} is not a valid value") from None


def _shift_images(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Shift each (H, W, C) image by (dy[i], dx[i]) pixels, zero fill. New array."""
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    pairs = np.stack([dy, dx], axis=1)
    for a, b in np.unique(pairs, axis=0):
        sel = np.flatnonzero((dy == a) & (dx == b))
        a, b = int(a), int(b)
        if abs(a) >= h or abs(b) >= w:
            continue
        out[sel, max(a, 0):h + min(a, 0), max(b, 0):w + min(b, 0)] = x[
            sel, max(-a, 0):h - max(a, 0), max(-b, 0):w - max(b, 0)
        ]
    return out


def augment_images(
    x: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    image_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Augment a batch of images with values in [0, 1]; returns a new float32 array.

    ``x`` is (N, H, W, C), (N, H, W), or flat (N, D) together with ``image_shape``
    ((H, W) or (H, W, C)); the result has the shape of ``x``.
    """
    x = np.asarray(x)
    if x.ndim == 4:
        shape4 = x.shape
    elif x.ndim == 3:
        shape4 = (*x.shape, 1)
    elif x.ndim == 2:
        if image_shape is None:
            raise DataError("flat images need image_shape=(H, W[, C]) to be augmented")
        dims = tuple(int(d) for d in image_shape)
        if len(dims) == 2:
            dims = (*dims, 1)
        if len(dims) != 3 or math.prod(dims) != x.shape[1]:
            raise DataError(f"image_shape {image_shape} does not match {x.shape[1]} features")
        shape4 = (len(x), *dims)
    else:
        raise DataError(f"cannot augment images of shape {x.shape}")
    out = x.astype(np.float32, copy=True).reshape(shape4)
    n = len(out)
    if cfg.shift > 0 and n:
        dy, dx = rng.integers(-cfg.shift, cfg.shift + 1, size=(2, n))
        out = _shift_images(out, dy, dx)
    if cfg.flip and n:
        mask = rng.random(n) < 0.5
        out[mask] = out[mask][:, :, ::-1]
    if cfg.noise > 0:
        out += np.float32(cfg.noise) * rng.standard_normal(out.shape, dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out.reshape(x.shape)


def _warp_positions(n: int, t: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """(n, t) fractional source positions for a smooth random time warp of each example."""
    knots_x = np.linspace(0.0, t - 1.0, _WARP_KNOTS + 2)
    speeds = np.clip(1.0 + strength * rng.standard_normal((n, _WARP_KNOTS + 2)), 0.1, None)
    grid = np.arange(t, dtype=np.float64)
    pos = np.empty((n, t))
    for i in range(n):
        speed = np.interp(grid, knots_x, speeds[i])
        warped = np.cumsum(speed)
        warped = (warped - warped[0]) / (warped[-1] - warped[0]) * (t - 1)
        # original step j is moved to time warped[j]; resample on the uniform grid
        pos[i] = np.interp(grid, warped, grid)
    return pos


def augment_series(
    x: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    clip: tuple[float, float] | None = None,
) -> np.ndarray:
    """Augment (N, T, F) windows: time warp, then magnitude scaling, then jitter.

    ``clip`` optionally bounds the result (e.g. (0, 1) for image rows as sequences).
    Returns a new float32 array of the same shape.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise DataError(f"series augmentation needs (N, T, F), got shape {x.shape}")
    out = x.astype(np.float32, copy=True)
    n, t, f = out.shape
    if cfg.warp > 0 and n and t > 1:
        pos = _warp_positions(n, t, cfg.warp, rng)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, t - 1)
        frac = (pos - lo).astype(np.float32)[..., np.newaxis]
        rows = np.arange(n)[:, np.newaxis]
        out = out[rows, lo] * (1.0 - frac) + out[rows, hi] * frac
    if cfg.scale > 0:
        factors = 1.0 + np.float32(cfg.scale) * rng.standard_normal((n, 1, f), dtype=np.float32)
        out = out * factors
    if cfg.jitter > 0:
        out = out + np.float32(cfg.jitter) * rng.standard_normal(out.shape, dtype=np.float32)
    if clip is not None:
        np.clip(out, clip[0], clip[1], out=out)
    return out.astype(np.float32, copy=False)


def make_augmenter(
    cfg: AugmentConfig | Mapping[str, Any] | str | None,
    layout: str,
    image_shape: tuple[int, ...] | None = None,
) -> Augmenter:
    """A ``(x, rng) -> x'`` function for a dataset layout (see ``datasets.LAYOUTS``).

    ``images``/``flat`` take image options only (flat inputs need ``image_shape`` or a
    square feature count, e.g. 784 -> 28x28); ``sequences`` (image rows as time steps)
    takes both kinds, clipped to [0, 1]; ``series`` (sensor windows) takes series options
    only. With nothing enabled the augmenter returns its input unchanged.
    """
    conf = AugmentConfig.parse(cfg)
    if layout not in ("images", "flat", "sequences", "series"):
        raise DataError(f"unknown layout {layout!r} for augmentation")
    if conf.series_ops and layout in ("images", "flat"):
        raise DataError(f"jitter/scale/warp need sequence data, not layout {layout!r}")
    if conf.image_ops and layout == "series":
        raise DataError("shift/flip/noise are image options; use jitter/scale/warp for series")
    if not conf.enabled:
        return _identity

    def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if layout == "flat":
            shape = image_shape
            if shape is None:
                side = math.isqrt(x.shape[1]) if x.ndim == 2 else 0
                if side * side != (x.shape[1] if x.ndim == 2 else -1):
                    raise DataError(
                        f"cannot infer an image shape for {x.shape}; pass image_shape"
                    )
                shape = (side, side)
            return augment_images(x, rng, conf, image_shape=shape)
        if layout == "images":
            return augment_images(x, rng, conf)
        out = x
        if conf.image_ops:
            out = augment_images(out, rng, conf)
        if conf.series_ops:
            out = augment_series(out, rng, conf, clip=(0.0, 1.0) if layout == "sequences" else None)
        return out

    log.debug("augmenter for layout %s: %s", layout, conf)
    return augment


def _identity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x
