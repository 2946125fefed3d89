"""The aggregator's HE mode over the real engine and state directory (no MQTT): sealing,
the decryptor's answer, late and re-weighted updates, the timeout, restart, and that the
aggregator only ever loads a public context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.he import AwaitDecryption, he_mode, install_he
from aggregator.store import Store
from fedmq.errors import ConfigError
from fedmq.models.spec import ModelBundle
from fedmq.privacy.he import HEContext
from fedmq.privacy.he import available as he_available
from fedmq.privacy.he_decrypt import Decryptor, SumRequest
from fedmq.update.codecs import unregister
from fedmq.update.codecs.ckks import Ckks
from fedmq.wire import UpdateMessage, decode_model, encode
from fedmq_ops.he_cli import write_keys
from tests.fakes import exact_delta, model_weights

if not he_available():
    pytest.skip("TenSEAL (the he extra) is not installed", allow_module_level=True)

T0 = 1_000.0


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fedmq.privacy.he import HEParams

    return write_keys(tmp_path_factory.mktemp("keys"), HEParams())


@pytest.fixture(autouse=True)
def _forget_codec() -> Any:
    yield
    unregister("ckks")


def _config(tmp_path: Path, public: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none",
        "selection": "any", "clients_per_round": 3, "min_updates": 3, "round_timeout": 60.0,
        "abandon_after": 30.0, "max_update_bytes": 4 * 1024 * 1024, "norm_bound": "off",
        "he_context": str(public), "he_decrypt_timeout": 100.0,
    }
    base.update(kw)
    return AggregatorConfig(**base)


def _engine(cfg: AggregatorConfig, bundle: ModelBundle) -> tuple[Engine, AwaitDecryption]:
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    mode = install_he(cfg, engine)
    assert mode is not None and he_mode(engine) is mode
    return engine, mode


def _update(codec: Ckks, device: str, delta: dict[str, np.ndarray], n: int,
            weight: float | None = None, round_id: int = 1) -> bytes:
    tensors = codec.encode_weighted(delta, float(weight or n)).tensors
    return encode(UpdateMessage("f", round_id, 0, device, f"u-{device}-{round_id}", n, "ckks",
                                tensors, created_at=T0))


def test_config_refuses_what_a_ciphertext_cannot_do(tmp_path: Path, keys: tuple[Path, Path]
                                                    ) -> None:
    for bad in ({"norm_bound": "adaptive"}, {"round_policy": "fedbuff"},
                {"strategy": "median"}, {"clip_updates": "fixed", "clip_norm": 1.0}):
        with pytest.raises(ConfigError, match="he_context"):
            _config(tmp_path, keys[0], **bad)


def test_aggregator_refuses_the_secret_context(tmp_path: Path, bundle: ModelBundle,
                                               keys: tuple[Path, Path]) -> None:
    cfg = _config(tmp_path, keys[1])  # the operator's secret.ctx by mistake
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    with pytest.raises(ConfigError, match="holds a secret key"):
        install_he(cfg, engine)
    engine.store.close()


def test_encrypted_round_closes_with_the_decrypted_mean(
    tmp_path: Path, bundle: ModelBundle, keys: tuple[Path, Path]
) -> None:
    public_path, secret_path = keys
    engine, mode = _engine(_config(tmp_path, public_path), bundle)
    out = engine.start(T0)
    fold = engine.ingest.fold
    assert fold is not None and not fold.he.has_secret_key  # the aggregator's context
    w0 = model_weights(next(decode_model(o.payload) for o in out if o.topic.endswith("/model")))
    he = HEContext.load(public_path.read_bytes(), secret=False)
    codec = Ckks(he)
    shapes = dict(engine.template)
    deltas = [exact_delta(shapes, s) for s in range(4)]
    counts = [30, 50, 20]
    # a device that pre-scaled by another weight than its claim: refused with the reason
    ack = engine.handle_update("d9", _update(codec, "d9", deltas[3], 40, weight=41), T0 + 1)
    assert not ack.accepted and "re-weighted" in ack.reason
    for i, n in enumerate(counts):
        ack = engine.handle_update(f"d{i}", _update(codec, f"d{i}", deltas[i], n), T0 + 1)
        assert ack.accepted, ack.reason
    assert engine.tick(T0 + 2) == []  # ready, but sealed and waiting for the decryptor
    sums = mode.take_outgoing()
    assert [o.topic for o in sums] == ["fl/f/he/sum"] and sums[0].retain
    late = engine.handle_update("d3", _update(codec, "d3", deltas[3], 10), T0 + 3)
    assert not late.accepted and late.code == "round_closed"
    secret = HEContext.load(secret_path.read_bytes(), secret=True)
    decryptor = Decryptor(secret, "f", tmp_path / "dec.json")
    answer = decryptor.handle(sums[0].payload)
    assert answer is not None
    mode.on_message("fl/f/he/mean", answer)
    models = [decode_model(o.payload) for o in engine.tick(T0 + 4)
              if o.topic.endswith("/model")]
    assert [m.version for m in models] == [1]
    w1 = model_weights(models[0])
    for name in shapes:
        plain = sum(n * d[name].astype(np.float64) for n, d in zip(counts, deltas, strict=False))
        np.testing.assert_allclose(w1[name] - w0[name], plain / sum(counts), atol=1e-5)
    req = SumRequest.decode(sums[0].payload)
    assert req.count == 3 and req.total_weight == 100.0
    engine.store.close()


def test_sealed_round_abandoned_without_the_decryptor_and_restart_reseals(
    tmp_path: Path, bundle: ModelBundle, keys: tuple[Path, Path]
) -> None:
    public_path, _ = keys
    cfg = _config(tmp_path, public_path)
    engine, mode = _engine(cfg, bundle)
    engine.start(T0)
    codec = Ckks(HEContext.load(public_path.read_bytes(), secret=False))
    shapes = dict(engine.template)
    for i in range(3):
        engine.handle_update(f"d{i}", _update(codec, f"d{i}", exact_delta(shapes, i), 10),
                             T0 + 1)
    engine.tick(T0 + 2)
    digest = SumRequest.decode(mode.take_outgoing()[0].payload).digest
    engine.store.close()
    # restart before the answer: the journal re-folds to the same sum (same digest)
    engine, mode = _engine(cfg, bundle)
    engine.start(T0 + 3)
    engine.tick(T0 + 4)
    again = mode.take_outgoing()
    assert SumRequest.decode(again[0].payload).digest == digest
    assert engine.coordinator.round is not None
    engine.tick(T0 + 4 + 101)  # he_decrypt_timeout passed
    assert engine.coordinator.round is None or engine.coordinator.round.round_id == 2
    assert engine.store.round(1).status == "abandoned"
    engine.store.close()


def test_fuzzed_encrypted_updates_get_a_reasoned_reject(
    tmp_path: Path, bundle: ModelBundle, keys: tuple[Path, Path]
) -> None:
    """Damaged ciphertexts inside well-formed messages, and damaged messages: every one is
    answered with an ack (a reason when rejected), nothing raises. Each comes from its own
    device so that the one-update-per-device rule does not hide a missing check."""
    import random

    from fedmq.tensor import Tensor

    public_path = keys[0]
    engine, _ = _engine(_config(tmp_path, public_path), bundle)
    engine.start(T0)
    codec = Ckks(HEContext.load(public_path.read_bytes(), secret=False))
    shapes = dict(engine.template)
    good = codec.encode_weighted(exact_delta(shapes, 0), 10.0).tensors
    rng = random.Random(11)
    rejected = 0
    reasons: set[str] = set()
    for i in range(80):
        tensors = list(good)
        k = rng.randrange(len(tensors))
        data = bytearray(tensors[k].data)
        kind = i % 4
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(min(64, len(data)))] = rng.randrange(256)
        elif kind == 2:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
        t = tensors[k]
        tensors[k] = Tensor(t.name, "uint8", (len(data),), bytes(data), dict(t.params))
        payload = encode(UpdateMessage("f", 1, 0, f"fz{i}", f"fz-{i}", 10, "ckks", tuple(tensors),
                                       created_at=T0))
        if i % 5 == 0:  # and damage the message itself sometimes
            raw = bytearray(payload)
            raw[rng.randrange(len(raw))] ^= 0xFF
            payload = bytes(raw)
        ack = engine.handle_update(f"fz{i}", payload, T0 + 1)
        if not ack.accepted:
            rejected += 1
            assert ack.code and ack.reason
            reasons.add(ack.code)
    # a flipped byte inside a coefficient can still be a valid ciphertext (of another value:
    # the device's signature is what protects the content); everything else is refused
    assert rejected >= 70, rejected
    assert reasons <= {"bad_codec", "shape_mismatch", "too_large", "malformed", "wrong_round",
                       "wrong_fleet", "device_mismatch", "schema_version", "round_closed"}
