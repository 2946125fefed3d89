"""Additively homomorphic aggregation with CKKS (TenSEAL): keys, strict ciphertext reading,
encryption in slot-sized batches, sums and decryption. Pure: no network I/O.

Roles (docs/privacy.md, "Homomorphic encryption"): the **decryptor** (an operator) makes the
keys with :func:`keygen` and keeps the secret context; devices and the aggregator get the
public context (public key only: no secret key, no relinearisation or Galois keys, which a
sum does not need). A device encrypts ``weight * delta`` flattened over the model's tensors
(template order) into ``ceil(values / slots)`` ciphertexts; the aggregator adds ciphertexts;
the decryptor decrypts the sum and divides by the total weight.

``tenseal`` is an optional dependency (``pip install 'fedmq[he]'``), imported only here and
only when a function needs it; nothing else in fedmq imports it.

Every received ciphertext goes through :func:`read_ciphertext`: the outer TenSEAL message is
parsed strictly here (field by field, no unknown or trailing bytes), then SEAL loads it
(which checks the header, the sizes and that every coefficient is reduced), then its shape is
checked against the context (two polynomials, the first data level, the context's scale, the
expected value count, not transparent). Anything else is a :class:`WireError` with a reason,
never a TenSEAL exception.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import ConfigError, RejectReason, WireError

__all__ = [
    "DEFAULT_PARAMS",
    "available",
    "MAX_SUM_UPDATES",
    "HEContext",
    "HEParams",
    "decrypt_flat",
    "encrypt_flat",
    "flatten",
    "keygen",
    "read_ciphertext",
    "sum_ciphertexts",
    "unflatten",
]

# At most this many updates go into one sum: the per-update value bound below leaves room
# for them (CKKS sums wrap silently when they exceed the modulus).
MAX_SUM_UPDATES = 1024


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters. The default (N = 8192, moduli 60 + 40 bits, scale 2^36) keeps one
    60-bit data prime: a ciphertext is 2 x 8192 x 8 bytes for 4096 values (32 bytes per
    value), the total modulus (100 bits) is far below the 218 bits that 128-bit security
    allows at N = 8192, and sums stay exact to about 1e-6 absolute per value."""

    poly_degree: int = 8192
    coeff_bits: tuple[int, ...] = (60, 40)
    scale_bits: int = 36

    def __post_init__(self) -> None:
        if self.poly_degree not in (4096, 8192, 16384, 32768):
            raise ConfigError(
                f"poly degree must be 4096-32768 (a power of 2), got {self.poly_degree}"
            )
        if len(self.coeff_bits) < 2 or any(not 20 <= b <= 60 for b in self.coeff_bits):
            raise ConfigError(f"coeff bits need >= 2 primes of 20-60 bits, got {self.coeff_bits}")
        if not 20 <= self.scale_bits < self.data_bits - 10:
            raise ConfigError(
                f"scale bits {self.scale_bits} must be >= 20 and leave >= 10 bits of the "
                f"{self.data_bits}-bit data modulus"
            )

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (the last prime is special)."""
        return sum(self.coeff_bits[:-1])

    @property
    def max_abs_sum(self) -> float:
        """|value| a decrypted sum may reach without wrapping (one bit of margin)."""
        return 2.0 ** (self.data_bits - self.scale_bits - 2)

    @property
    def max_abs_update(self) -> float:
        """|weight * delta| one update may hold so that MAX_SUM_UPDATES of them still fit."""
        return self.max_abs_sum / MAX_SUM_UPDATES


DEFAULT_PARAMS = HEParams()


def available() -> bool:
    """Whether TenSEAL can be loaded (the ``he`` extra is installed). Import it only through
    this module, never with a plain ``import tenseal`` (see :func:`_tenseal`)."""
    try:
        _tenseal()
    except ConfigError:
        return False
    return True


def _tenseal() -> Any:
    # TenSEAL links its own protobuf. When TensorFlow was loaded first, TenSEAL's protobuf
    # calls bind to TensorFlow's copy and the process segfaults in serialize() (measured:
    # `import tensorflow` then keygen() -> SIGSEGV). RTLD_DEEPBIND makes the extension use
    # its own symbols first (glibc; elsewhere the flag is absent and this is a no-op).
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))
    try:
        import tenseal
    except ImportError as exc:  # optional extra
        raise ConfigError(
            "homomorphic encryption needs TenSEAL: pip install 'fedmq[he]' (tenseal==0.3.18)"
        ) from exc
    finally:
        sys.setdlopenflags(flags)
    return tenseal


def keygen(params: HEParams = DEFAULT_PARAMS) -> tuple[bytes, bytes]:
    """A new key pair as (public context, secret context) bytes. The public one holds the
    public key only; the secret one also the secret key (the decryptor's)."""
    ts = _tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_degree,
        coeff_mod_bit_sizes=list(params.coeff_bits),
    )
    ctx.global_scale = 2.0**params.scale_bits
    secret = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False,
        save_relin_keys=False,
    )
    ctx.make_context_public()
    public = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False,
        save_relin_keys=False,
    )
    return bytes(public), bytes(secret)


class HEContext:
    """A loaded CKKS context and what the ciphertext checks need from it."""

    def __init__(self, ctx: Any, params: HEParams) -> None:
        self.ctx = ctx
        self.params = params
        first = ctx.seal_context().data.first_context_data()
        self._parms_id = list(first.parms_id())
        self.scale = float(ctx.global_scale)

    @property
    def has_secret_key(self) -> bool:
        return bool(self.ctx.is_private())

    @classmethod
    def load(cls, data: bytes, *, secret: bool, what: str = "HE context") -> HEContext:
        """Read a context from :func:`keygen` bytes. ``secret`` says which one is expected:
        a public context that holds a secret key is refused (it must never reach a device or
        the aggregator), as is a secret context without one."""
        ts = _tenseal()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on damaged bytes
            raise ConfigError(f"{what} is not a TenSEAL context: {exc}") from exc
        if ctx.is_private() != secret:
            has = "holds" if ctx.is_private() else "has no"
            raise ConfigError(
                f"{what} {has} a secret key: expected the "
                f"{'secret' if secret else 'public'} context of `fedmq he keygen`"
            )
        if not ctx.has_public_key():
            raise ConfigError(f"{what} has no public key")
        first = ctx.seal_context().data.first_context_data()
        key = ctx.seal_context().data.key_context_data()
        degree = int(first.parms().poly_modulus_degree())
        data_bits = int(first.total_coeff_modulus_bit_count())
        key_bits = int(key.total_coeff_modulus_bit_count())
        scale = float(ctx.global_scale)
        scale_bits = round(math.log2(scale)) if scale > 0 else 0
        if scale <= 0 or 2.0**scale_bits != scale:
            raise ConfigError(f"{what}: global scale {scale} is not a power of 2")
        params = HEParams(degree, (data_bits, key_bits - data_bits), scale_bits)
        return cls(ctx, params)

    def vector_count(self, values: int) -> int:
        """Ciphertexts for ``values`` values."""
        return -(-values // self.params.slots)

    def batch_sizes(self, values: int) -> list[int]:
        """How many values each ciphertext of a ``values``-long vector holds."""
        s = self.params.slots
        return [min(s, values - i) for i in range(0, values, s)]


def flatten(delta: Mapping[str, np.ndarray], order: Iterable[str]) -> np.ndarray:
    """The tensors of ``delta`` in ``order``, concatenated as one float64 vector."""
    return np.concatenate([np.asarray(delta[n], np.float64).reshape(-1) for n in order])


def unflatten(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a flat vector back into float32 tensors of ``shapes`` (in its order)."""
    out: dict[str, np.ndarray] = {}
    at = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = np.asarray(flat[at:at + n], np.float32).reshape(shape)
        at += n
    if at != flat.size:
        raise ValueError(f"{flat.size} values do not fill the model's {at}")
    return out


def encrypt_flat(he: HEContext, values: np.ndarray) -> list[bytes]:
    """``values`` (finite, |x| <= ``max_abs_update``) as serialised ciphertexts of at most
    ``slots`` values each. Raises ``ValueError`` on values it must not encrypt: a CKKS sum
    that exceeds its modulus wraps around silently."""
    x = np.asarray(values, np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError("cannot encrypt NaN or infinite values")
    peak = float(np.abs(x).max(initial=0.0))
    if peak > he.params.max_abs_update:
        raise ValueError(
            f"|weight x delta| reaches {peak:.4g}, above {he.params.max_abs_update:.4g} that "
            f"{MAX_SUM_UPDATES} updates can sum under these CKKS parameters"
        )
    ts = _tenseal()
    s = he.params.slots
    return [bytes(ts.ckks_vector(he.ctx, x[i:i + s]).serialize()) for i in range(0, x.size, s)]


# The outer TenSEAL message (CKKSVectorProto): 1 = shape (packed varints), 2 = the SEAL
# ciphertext (repeated; one here), 3 = scale (double). Parsed here so unknown fields,
# repeated ciphertexts and trailing bytes are refused before TenSEAL sees the data.
_SHAPE, _CIPHER, _SCALE = 0x0A, 0x12, 0x19


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if at + i >= len(data):
            raise WireError("ciphertext: truncated varint", RejectReason.BAD_CODEC)
        b = data[at + i]
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, at + i + 1
    raise WireError("ciphertext: varint too long", RejectReason.BAD_CODEC)


def _outer_fields(data: bytes) -> tuple[list[int], bytes, float]:
    """(shape, SEAL ciphertext bytes, scale) of a serialised CKKS vector, strictly."""
    at = 0
    seen: dict[int, object] = {}
    while at < len(data):
        tag = data[at]
        at += 1
        if tag in seen or tag not in (_SHAPE, _CIPHER, _SCALE):
            raise WireError(
                f"ciphertext: unexpected or repeated field tag {tag:#x} at byte {at - 1}",
                RejectReason.BAD_CODEC,
            )
        if tag == _SCALE:
            if at + 8 > len(data):
                raise WireError("ciphertext: truncated scale", RejectReason.BAD_CODEC)
            seen[tag] = struct.unpack_from("<d", data, at)[0]
            at += 8
            continue
        length, at = _varint(data, at)
        if at + length > len(data):
            raise WireError("ciphertext: field runs past the end", RejectReason.BAD_CODEC)
        body = data[at:at + length]
        at += length
        if tag == _SHAPE:
            dims, i = [], 0
            while i < len(body):
                d, i = _varint(body, i)
                dims.append(d)
            seen[tag] = dims
        else:
            seen[tag] = body
    if _CIPHER not in seen or _SCALE not in seen:
        raise WireError("ciphertext: missing ciphertext or scale", RejectReason.BAD_CODEC)
    shape = seen.get(_SHAPE, [])
    assert isinstance(shape, list)
    cipher, scale = seen[_CIPHER], seen[_SCALE]
    assert isinstance(cipher, bytes) and isinstance(scale, float)
    return shape, cipher, scale


def read_ciphertext(he: HEContext, data: bytes, values: int, what: str = "ciphertext") -> Any:
    """A TenSEAL CKKS vector of ``values`` values from received bytes, checked against the
    context (module docstring); :class:`WireError` (``bad_codec``) otherwise."""
    if not isinstance(data, bytes) or not data:
        raise WireError(f"{what}: empty", RejectReason.BAD_CODEC)
    limit = 2 * he.params.poly_degree * 8 * len(he.params.coeff_bits) + 4096
    if len(data) > limit:
        raise WireError(f"{what}: {len(data)} bytes, more than {limit}", RejectReason.TOO_LARGE)
    try:
        shape, _, scale = _outer_fields(data)
    except WireError as exc:
        raise WireError(f"{what}: {exc.reason}", exc.code) from exc
    if shape != [values]:
        raise WireError(
            f"{what}: holds shape {shape}, expected [{values}]", RejectReason.SHAPE
        )
    if scale != he.scale:
        raise WireError(f"{what}: scale {scale:g}, the context's is {he.scale:g}",
                        RejectReason.BAD_CODEC)
    ts = _tenseal()
    try:
        vec = ts.ckks_vector_from(he.ctx, data)
        cts = vec.ciphertext()
        ok = (
            vec.size() == values
            and len(cts) == 1
            and cts[0].size() == 2
            and list(cts[0].parms_id()) == he._parms_id
            and float(cts[0].scale) == he.scale
            and cts[0].poly_modulus_degree() == he.params.poly_degree
            and cts[0].is_ntt_form()
            and not cts[0].is_transparent()
        )
    except Exception as exc:  # SEAL/TenSEAL raise ValueError or RuntimeError on bad data
        raise WireError(f"{what}: not a valid ciphertext: {exc}", RejectReason.BAD_CODEC) from exc
    if not ok:
        raise WireError(
            f"{what}: not a fresh 2-polynomial ciphertext of {values} values at the context's "
            "first level and scale",
            RejectReason.BAD_CODEC,
        )
    return vec


def sum_ciphertexts(vectors: Sequence[Any]) -> Any:
    """The sum of checked CKKS vectors of one size (a new vector)."""
    if not vectors:
        raise ValueError("nothing to sum")
    out = vectors[0].copy()
    for v in vectors[1:]:
        out.add_(v)
    return out


def decrypt_flat(he: HEContext, vectors: Sequence[Any]) -> np.ndarray:
    """The float64 values of ``vectors`` (with the secret key), concatenated."""
    if not he.has_secret_key:
        raise ConfigError("decrypting needs the secret context (the decryptor's)")
    parts = [np.asarray(v.decrypt(), np.float64) for v in vectors]
    return np.concatenate(parts) if parts else np.zeros(0)
