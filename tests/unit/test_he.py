"""Homomorphic aggregation (CKKS via TenSEAL): round trip, sums, key separation, strict
ciphertext reading and the decryptor's rules (docs/privacy.md, "Homomorphic encryption")."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from fedmq.errors import ConfigError, Rejected, WireError
from fedmq.privacy.he import (
    HEContext,
    decrypt_flat,
    encrypt_flat,
    keygen,
    read_ciphertext,
    sum_ciphertexts,
)
from fedmq.privacy.he import (
    available as he_available,
)
from fedmq.privacy.he_decrypt import Decryptor, MeanResult, SumRequest
from fedmq.privacy.he_sum import CkksSum, HEPending
from fedmq.update.codecs.ckks import Ckks

if not he_available():
    pytest.skip("TenSEAL (the he extra) is not installed", allow_module_level=True)

# CKKS is approximate: with the default parameters (scale 2^36) a fresh ciphertext decrypts
# to within ~1e-6 of each value, and a sum of n adds the errors. The tests check sums of
# values of order 1-100 to 1e-4 absolute, far above the measured error (~1e-6) and far below
# anything that matters for a model delta.
TOL = 1e-4
SHAPES = {"w": (70, 90), "b": (90,)}  # 6,390 values: 2 ciphertexts of 4,096 slots


@pytest.fixture(scope="module")
def keys() -> tuple[HEContext, HEContext]:
    public, secret = keygen()
    return HEContext.load(public, secret=False), HEContext.load(secret, secret=True)


def _deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(n)]


def test_public_context_has_no_secret_key(keys: tuple[HEContext, HEContext]) -> None:
    public, secret = keys
    assert not public.has_secret_key and secret.has_secret_key
    assert not public.ctx.is_private() and public.ctx.is_public()
    with pytest.raises(ValueError):  # TenSEAL: no secret key in a public context
        public.ctx.secret_key()
    # what the aggregator and devices load must never be the secret context, and back
    sk = secret.ctx.serialize(save_secret_key=True)
    with pytest.raises(ConfigError, match="holds a secret key"):
        HEContext.load(sk, secret=False)
    pk = public.ctx.serialize()
    with pytest.raises(ConfigError, match="has no"):
        HEContext.load(pk, secret=True)
    with pytest.raises(ConfigError, match="decryptor"):
        decrypt_flat(public, [])


def test_round_trip_and_sum(keys: tuple[HEContext, HEContext]) -> None:
    public, secret = keys
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 10, 5000) for _ in range(8)]
    encrypted = [encrypt_flat(public, x) for x in xs]
    assert [len(e) for e in encrypted] == [2] * 8  # 5000 values in 4096-slot batches
    one = [read_ciphertext(secret, b, n) for b, n in zip(encrypted[0], (4096, 904), strict=True)]
    assert np.abs(decrypt_flat(secret, one) - xs[0]).max() < TOL
    sums = []
    for i, n in enumerate((4096, 904)):
        vecs = [read_ciphertext(public, e[i], n) for e in encrypted]
        sums.append(bytes(sum_ciphertexts(vecs).serialize()))
    got = decrypt_flat(secret, [read_ciphertext(secret, b, n)
                                for b, n in zip(sums, (4096, 904), strict=True)])
    assert np.abs(got - np.sum(xs, axis=0)).max() < TOL


def test_accumulator_sums_weighted_updates_and_decryptor_gives_mean(
    keys: tuple[HEContext, HEContext], tmp_path: Path
) -> None:
    public, secret = keys
    codec = Ckks(public)
    acc = CkksSum(SHAPES, public)
    deltas, weights = _deltas(5), [3.0, 10.0, 1.0, 7.0, 2.0]
    for d, w in zip(deltas, weights, strict=True):
        acc.fold(codec.encode_weighted(d, w).tensors, "ckks", w)
    with pytest.raises(HEPending):
        acc.result()
    blobs, digest = acc.seal()
    with pytest.raises(Rejected, match="decryptor"):  # sealed: no more updates
        acc.fold(codec.encode_weighted(deltas[0], 1.0).tensors, "ckks", 1.0)
    req = SumRequest("lab", "e1", 1, acc.count, acc.total_weight, dict(SHAPES), tuple(blobs),
                     digest)
    dec = Decryptor(secret, "lab", tmp_path / "state.json")
    answer = dec.handle(req.encode())
    assert answer is not None
    res = MeanResult.decode(answer)
    acc.set_mean(res.digest, res.count, res.total_weight, res.mean)
    mean = acc.result().mean
    for k in SHAPES:
        plain = sum(w * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=True))
        assert np.abs(mean[k] - plain / sum(weights)).max() < TOL / sum(weights)
    # the same sum again (an aggregator restart) gets the same answer; another sum for the
    # same round is refused, also after the decryptor restarts
    assert dec.handle(req.encode()) == answer
    other = CkksSum(SHAPES, public)
    for d in deltas[:3]:
        other.fold(codec.encode_weighted(d, 1.0).tensors, "ckks", 1.0)
    b2, g2 = other.seal()
    req2 = SumRequest("lab", "e1", 1, 3, 3.0, dict(SHAPES), tuple(b2), g2)
    assert dec.handle(req2.encode()) is None
    assert Decryptor(secret, "lab", tmp_path / "state.json").handle(req2.encode()) is None
    # fewer updates than the decryptor's minimum: refused
    single = CkksSum(SHAPES, public)
    single.fold(codec.encode_weighted(deltas[0], 1.0).tensors, "ckks", 1.0)
    b3, g3 = single.seal()
    lone = SumRequest("lab", "e1", 2, 1, 1.0, dict(SHAPES), tuple(b3), g3)
    assert dec.handle(lone.encode()) is None


def test_weight_mismatch_and_structure_rejected(keys: tuple[HEContext, HEContext]) -> None:
    public, _ = keys
    codec = Ckks(public)
    acc = CkksSum(SHAPES, public)
    tensors = codec.encode_weighted(_deltas(1)[0], 20.0).tensors
    with pytest.raises(Rejected, match="cannot be re-weighted"):
        acc.check(tensors, "ckks", 10.0)  # e.g. the aggregator capped the claim
    with pytest.raises(Rejected, match="ciphertexts"):
        acc.check(tensors[:1], "ckks", 20.0)
    with pytest.raises(Rejected, match="ckks"):
        acc.check(tensors, "float32", 20.0)
    with pytest.raises(ValueError):
        codec.encode(_deltas(1)[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="above"):  # would wrap the sum silently
        codec.encode_weighted(_deltas(1)[0], 1e9)
    assert acc.count == 0


def _mutations(blob: bytes, rng: random.Random) -> list[bytes]:
    out = [b"", b"\x00", blob[:10], blob[: len(blob) // 2], blob + b"xx", blob + blob,
           b"\x0a\x01\x05" + blob[3:], bytes(64)]
    for _ in range(40):
        d = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(min(len(d), 80))] = rng.randrange(256)  # header area
        out.append(bytes(d))
    for _ in range(20):
        d = bytearray(blob)
        cut = rng.randrange(len(d))
        out.append(bytes(d[:cut]) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 9))))
    return out


def test_malformed_ciphertexts_rejected_with_a_reason(keys: tuple[HEContext, HEContext]) -> None:
    """Garbage, truncation, trailing bytes, header damage: a WireError each (never a TenSEAL
    exception, never a crash); a damaged coefficient that still decodes is accepted only as
    a well-formed ciphertext (the signature is what protects its content)."""
    public, _ = keys
    blob = encrypt_flat(public, np.ones(100))[0]
    assert read_ciphertext(public, blob, 100).size() == 100
    with pytest.raises(WireError, match="shape"):
        read_ciphertext(public, blob, 99)
    rng = random.Random(7)
    accepted = 0
    for bad in _mutations(blob, rng):
        try:
            vec = read_ciphertext(public, bad, 100)
        except WireError as exc:
            assert exc.reason and exc.code in ("bad_codec", "shape_mismatch", "too_large")
        else:
            accepted += 1
            assert vec.size() == 100 and bad != blob
    assert accepted < 10
    # a ciphertext made under another key pair's parameters (another scale) is refused
    other_pub, _ = keygen(type(public.params)(8192, (60, 40), 30))
    other = HEContext.load(other_pub, secret=False)
    with pytest.raises(WireError, match="scale"):
        read_ciphertext(public, encrypt_flat(other, np.ones(100))[0], 100)


def test_sum_request_digest_checked(keys: tuple[HEContext, HEContext]) -> None:
    public, _ = keys
    blob = encrypt_flat(public, np.ones(10))[0]
    req = SumRequest("lab", "e", 1, 2, 2.0, {"w": (10,)}, (blob,), "0" * 64)
    with pytest.raises(WireError, match="digest"):
        SumRequest.decode(req.encode())
    for garbage in (b"", b"\x93\x01\x02", b"\x81\xa4type\xa6he_sum"):
        with pytest.raises(WireError):
            SumRequest.decode(garbage)


def test_tenseal_works_after_tensorflow_was_loaded() -> None:
    """TensorFlow's protobuf used to capture TenSEAL's symbols (a segfault in serialize);
    run in a fresh interpreter that imports TensorFlow first."""
    import subprocess
    import sys

    pytest.importorskip("tensorflow")
    code = (
        "import tensorflow\n"
        "import numpy as np\n"
        "from fedmq.privacy.he import HEContext, encrypt_flat, keygen\n"
        "p, s = keygen()\n"
        "print(len(encrypt_flat(HEContext.load(p, secret=False), np.ones(10))))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("1")


def test_keygen_writes_a_public_and_a_private_context_once(tmp_path: Path) -> None:
    from fedmq.privacy.he import HEParams
    from fedmq_ops.he_cli import write_keys

    public_path, secret_path = write_keys(tmp_path / "he", HEParams())
    assert secret_path.stat().st_mode & 0o777 == 0o600
    assert not HEContext.load(public_path.read_bytes(), secret=False).has_secret_key
    assert HEContext.load(secret_path.read_bytes(), secret=True).has_secret_key
    before = secret_path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to replace"):
        write_keys(tmp_path / "he", HEParams())
    assert secret_path.read_bytes() == before
