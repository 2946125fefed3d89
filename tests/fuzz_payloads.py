"""Malformed and adversarial update payloads for fuzzing the decoder and the aggregator.

:func:`fuzz_payload` starts from a valid update (the real wire format and codecs) and applies
one mutation: byte-level damage (bit flips, truncation, insertions, garbage), a field set to
a value of the wrong type or an absurd one (every field, including the tensors' name, dtype,
shape, params and data), NaN/Inf floats, huge or negative dimensions, wrong dtypes, msgpack
extension types, deeply nested maps, oversized strings, duplicate tensor names, a device id
that differs from the topic's, a wrong fleet/round/base version, int8 with an absurd scale,
signed envelopes (a valid or mutated body, damaged envelope fields, nested envelopes), and
model deltas and model indexes of the compressed downlink (:func:`fuzz_downlink`: the
same field, tensor, sparse and byte damage plus a wrong base version, a version 0, unknown
codecs and broken delta lists), damaged sparse and 4-bit tensors
(:func:`sparse_damage`: positions out of range, duplicated,
k larger than the tensor, wrong counts, bad or trailing varints, bitmap padding, packed int4
counts and padding nibbles, NaN or negative scales). :func:`fuzz_chunks` damages the
chunk stream of a chunked transfer (:data:`CHUNK_DAMAGE`: wrong index or count, a
total_bytes that disagrees with the data or with the first chunk, oversize, a transfer id
that is not the payload's hash, a late chunk of an expired transfer, fields of the wrong
type, byte damage). :func:`fuzz_mask` damages a pruning mask (:data:`MASK_DAMAGE`: unknown
or duplicated tensor, wrong size, bitmap too short or long, padding bits, a kept count that
disagrees with the bitmap, every weight pruned, extra keys, wrong types, byte damage).

Driven by a :class:`random.Random`, so hypothesis (``st.randoms()``) and a seeded generator
for the broker path share the same mutations.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

from fedmq.evaluation import EvalReport
from fedmq.update import codecs
from fedmq.update.codecs.lowbit import pack_nibbles
from fedmq.update.codecs.positions import bitmap_bytes, varint_encode
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import ModelDelta, ModelIndex, SitePartial, UpdateMessage, encode

__all__ = [
    "CHUNK_DAMAGE",
    "DOWNLINK_DAMAGE",
    "KINDS",
    "MASK_DAMAGE",
    "LOW_BIT_CODECS",
    "SPARSE_DAMAGE",
    "fuzz_chunks",
    "fuzz_downlink",
    "fuzz_mask",
    "fuzz_payload",
    "sparse_damage",
    "valid_update_map",
]

Obj = dict[str, Any]

_TOP_FIELDS = (
    "v", "type", "fleet", "round", "base_version", "device", "update_id", "num_examples",
    "codec", "tensors", "metrics", "created_at", "signature", "steps", "eval",
)
_TENSOR_FIELDS = ("name", "dtype", "shape", "params", "data")


def valid_update_map(
    rng: random.Random,
    template: Mapping[str, tuple[int, ...]],
    *,
    fleet: str,
    round_id: int,
    base_version: int,
    device: str,
    codec: str | None = None,
) -> Obj:
    """A valid update (as the msgpack map the wire format produces) for ``template``."""
    codec = codec or rng.choice(codecs.codec_names())
    nrng = np.random.default_rng(rng.getrandbits(32))
    delta = {n: nrng.normal(0, 0.05, s).astype(np.float32) for n, s in template.items()}
    msg = UpdateMessage(
        fleet=fleet, round_id=round_id, base_version=base_version, device=device,
        update_id=f"{rng.getrandbits(64):016x}", num_examples=rng.randint(1, 500), codec=codec,
        tensors=_encode(codec, delta, rng, nrng), metrics={"loss": 0.5},
        created_at=1.7e9, steps=rng.randint(1, 100),
        evaluation=EvalReport(loss=rng.random() * 3, accuracy=rng.random(),
                              count=rng.randint(1, 400), personal_loss=0.25,
                              personal_accuracy=rng.random()),
    )
    obj = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(obj, dict)
    return obj


def _encode(
    codec: str, delta: Mapping[str, np.ndarray], rng: random.Random, nrng: np.random.Generator
) -> Any:
    """Any registered codec (sparse ones at a random fraction, so both position fields)."""
    impl = codecs.get_codec(codec).configure({"topk_fraction": rng.choice([0.05, 0.3, 1.0])})
    return impl.encode(delta, nrng).tensors


def _pack(obj: Any) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


# ------------------------------------------------------------------------- weird values


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _generic_value(rng: random.Random) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice([0, -1, 1, 2**31, 2**62, 2**62 + 1, 2**63 - 1, -(2**63), 2**64 - 1]),
        lambda: rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324]),
        lambda: rng.choice(["", "x", "\0", "a/b", "+", "#", "é" * 10, "\x7f", " "]),
        lambda: "s" * rng.choice([65, 129, 4097, 70_000]),
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        lambda: [],
        lambda: [rng.randint(-5, 5) for _ in range(rng.randint(1, 12))],
        lambda: {},
        lambda: {"k": rng.random()},
        lambda: _nested(rng.randint(5, 400)),
        lambda: msgpack.ExtType(rng.randint(0, 127), b"\x01\x02"),
        lambda: msgpack.Timestamp(rng.randint(0, 2**32 - 1), 0),
    ]
    return rng.choice(choices)()


def _field_value(rng: random.Random, field: str, base: Obj) -> Any:
    """A value of the right type but a wrong or absurd content, or a generic weird one."""
    if rng.random() < 0.45:
        return _generic_value(rng)
    specific: dict[str, list[Any]] = {
        "v": [0, 2, -1, 255],
        "type": ["model", "ack", "status", "round", "UPDATE", "update\0"],
        "fleet": ["other", "", "f" * 65],
        "round": [base.get("round", 1) + d for d in (-1, 1, 2, 1000)] + [-1, 2**62 + 1],
        "base_version": [base.get("base_version", 0) + d for d in (1, 7)] + [-3],
        "device": ["someone-else", "dev/x", "dev+", "dev#", "a b", "", "\x00", "d" * 65],
        "update_id": ["", "\n", "u" * 65, "\x1b[31m"],
        "num_examples": [0, -1, 2**40 + 1, 2**40, 10_000_001, 1.5],
        "codec": ["float64", "int4", "", "INT8", "pickle"],
        "metrics": [{"loss": float("nan")}, {"x": "y"}, {str(i): 1.0 for i in range(300)}],
        "created_at": [float("inf"), float("nan"), "now"],
        "signature": [b"\x00" * 513, "sig", 1],
        "tensors": [[{}], [1, 2], [base["tensors"][0]] * 5000],
        "steps": [0, -1, 10**9 + 1, 1.5, True, "3"],
        "eval": [
            {"loss": float("nan"), "accuracy": 0.5, "count": 3},
            {"loss": 0.1, "accuracy": 1.5, "count": 3},
            {"loss": -0.1, "accuracy": 0.5, "count": 3},
            {"loss": 0.1, "accuracy": 0.5, "count": 0},
            {"loss": 0.1, "accuracy": 0.5, "count": 2**40 + 1},
            {"loss": 0.1, "accuracy": 0.5, "count": 3.0},
            {"loss": 0.1, "accuracy": 0.5, "count": 3, "pickle": 1},
            {"loss": 0.1, "accuracy": 0.5, "count": 3, "personal_loss": 0.2},
            {"loss": 0.1, "accuracy": True, "count": 3},
            {"accuracy": 0.5, "count": 3},
            [0.1, 0.5, 3], "eval", b"\x00",
        ],
    }
    return rng.choice(specific.get(field, [None]))


# ------------------------------------------------------------------------- mutations


def _byte_mutation(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    op = rng.choice(("flip", "truncate", "insert", "splice", "garbage", "empty", "append"))
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[rng.randrange(len(data)):]
    elif op == "insert":
        i = rng.randrange(len(data) + 1)
        data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
    elif op == "splice":
        i = rng.randrange(len(data))
        n = rng.randint(1, 32)
        data[i:i + n] = bytes(rng.getrandbits(8) for _ in range(n))
    elif op == "garbage":
        data = bytearray(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
    elif op == "empty":
        data = bytearray()
    else:
        data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def _elements(t: Obj) -> int:
    shape = t.get("shape")
    if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**20 for d in shape):
        return int(np.prod(shape, dtype=np.int64))
    return 1


def _tensor_mutation(rng: random.Random, obj: Obj) -> None:
    tensors = obj["tensors"]
    t = rng.choice(tensors)
    op = rng.choice(
        ("field", "delete", "shape", "dtype", "datalen", "nonfinite", "scale", "dupname",
         "params")
    )
    if op == "field":
        t[rng.choice(_TENSOR_FIELDS)] = _generic_value(rng)
    elif op == "delete":
        del t[rng.choice(_TENSOR_FIELDS)]
    elif op == "shape":
        t["shape"] = rng.choice([
            [2**31, 2**31], [2**62, 2**62, 2**62], [-1, 4], [0], [1] * 9, [1.5], ["3"],
            [True], [], [2**64 - 1], [-(2**63)], [3, -(2**62)], list(reversed(t["shape"])),
        ])
    elif op == "dtype":
        t["dtype"] = rng.choice(
            ["float64", "int16", "object", "O", "<f4", "", "float32\0", "bool", "complex64",
             "uint8", "int8", "float16", "float32"]
        )
    elif op == "datalen":
        n = len(t["data"])
        t["data"] = t["data"][: max(0, n - rng.randint(1, 4))] if rng.random() < 0.5 else (
            t["data"] + b"\0" * rng.randint(1, 4)
        )
    elif op == "nonfinite":
        bad = rng.choice([float("nan"), float("inf"), -float("inf")])
        kind = rng.choice(["<f4", "<f2"])
        size = max(1, _elements(t))
        values = np.zeros(size, kind)
        values[rng.randrange(size)] = bad
        t["dtype"] = "float32" if kind == "<f4" else "float16"
        t["data"] = values.tobytes()
        obj["codec"] = t["dtype"]
    elif op == "scale":
        obj["codec"] = "int8"
        t["dtype"] = "int8"
        size = max(1, _elements(t))
        t["data"] = np.full(size, rng.choice([127, -127, 1]), np.int8).tobytes()
        t["params"] = {"scale": rng.choice(
            [float("nan"), float("inf"), -1.0, 1e30, 1e29, 3e38, 1e-45, -0.0, 1e300]
        )} if rng.random() < 0.9 else {}
    elif op == "dupname":
        if len(tensors) > 1:
            tensors[1]["name"] = tensors[0]["name"]
        else:
            tensors.append(copy.deepcopy(tensors[0]))
    else:
        t["params"] = rng.choice(
            [{"scale": "x"}, {"scale": None}, {1: 2.0}, {"s": [1]}, [], "p",
             {str(i): 1.0 for i in range(20)}]
        )


def _semantic_mutation(rng: random.Random, obj: Obj) -> None:
    """A well-formed update that the round or the model must refuse."""
    op = rng.choice(("fleet", "round", "base", "device", "codec_dtype", "unknown_tensor",
                     "missing_tensor", "model_shape", "examples", "overflow"))
    if op == "fleet":
        obj["fleet"] = "another-fleet"
    elif op == "round":
        obj["round"] = obj["round"] + rng.choice([-1, 1, 5])
    elif op == "base":
        obj["base_version"] = obj["base_version"] + rng.randint(1, 9)
    elif op == "device":
        obj["device"] = obj["device"] + "-impostor"
    elif op == "codec_dtype":
        obj["codec"] = rng.choice([c for c in codecs.codec_names() if c != obj["codec"]])
    elif op == "unknown_tensor":
        obj["tensors"][0]["name"] = "not_a_layer"
    elif op == "missing_tensor":
        obj["tensors"].pop()
    elif op == "model_shape":
        t = obj["tensors"][0]
        item = np.dtype(t["dtype"]).itemsize
        t["shape"] = [len(t["data"]) // item]
    elif op == "examples":
        obj["num_examples"] = rng.choice([10_000_001, 2**40])
    else:  # finite values whose weighted sum overflows float32
        obj["codec"] = "float32"
        obj["num_examples"] = rng.choice([2, 1000, 2**40])
        for t in obj["tensors"]:
            n = _elements(t)
            t["dtype"], t["params"] = "float32", {}
            t.pop("extra", None)
            t["data"] = np.full(n, rng.choice([3e38, -3e38, 1e30]), "<f4").tobytes()


def _deep_bytes(rng: random.Random) -> bytes:
    """Nesting deeper than any packer allows, written by hand."""
    depth = rng.choice([600, 5000, 100_000])
    if rng.random() < 0.5:
        return b"\x81\xa1a" * depth + b"\xc0"  # {"a": {"a": ... nil}}
    return b"\x82\xa1v\x01\xa1x" + b"\x91" * depth + b"\xc0"  # {"v": 1, "x": [[[...]]]}


def _signed_mutation(rng: random.Random, base: Obj) -> bytes:
    """A signed envelope (signatures are not verified here): a valid or mutated body, or
    damage to the envelope itself."""
    inner_kind = rng.choice(("valid", *KINDS[:-1]))
    body = _pack(base) if inner_kind == "valid" else fuzz_payload(rng, base, inner_kind)[1]
    env: Obj = {"v": 2, "type": "signed", "body": body, "sig": rng.randbytes(64)}
    op = rng.choice(("ok", "ok", "field", "delete", "nested", "bytes"))
    if op == "field":
        key = rng.choice(("v", "type", "body", "sig"))
        env[key] = rng.choice([_generic_value(rng), b"", b"s" * 513, 1])
    elif op == "delete":
        del env[rng.choice(("body", "sig", "type"))]
    elif op == "nested":
        env["body"] = _pack({"v": 2, "type": "signed", "body": body, "sig": b"x" * 64})
    try:
        payload = _pack(env)
    except (ValueError, OverflowError, TypeError):
        payload = _pack({"v": 2, "type": "signed", "body": body, "sig": b"x" * 64})
    return _byte_mutation(rng, payload) if op == "bytes" else payload


# ------------------------------------------------------------------------- sparse, int4

LOW_BIT_CODECS = ("int4", "topk-f16", "topk-int8", "topk-int4", "stc")
SPARSE_DAMAGE = (
    "pos_range", "pos_dup", "k_too_big", "k_count", "k_fraction", "varint_dangling",
    "varint_long", "varint_overlong", "varint_trailing", "bitmap_len", "bitmap_pad",
    "both_fields", "no_positions", "values_count", "pad_bits", "neg_scale",
    "int4_scales_nan", "int4_scales_len", "int4_block", "int4_data",
)


def _stored(codec: str, k: int) -> bytes:
    """``k`` valid stored values of a sparse codec."""
    if codec == "topk-f16":
        return np.ones(k, "<f2").tobytes()
    if codec == "topk-int8":
        return np.ones(k, np.int8).tobytes()
    if codec == "topk-int4":
        return pack_nibbles(np.ones(k))
    return bytes((k + 7) // 8)


def _set_positions(t: Obj, codec: str, gaps: bytes, k: int) -> None:
    t["extra"] = {"gaps": gaps}
    t["params"]["k"] = float(k)
    t["data"] = _stored(codec, k)


def sparse_damage(rng: random.Random, obj: Obj, op: str) -> None:
    """Damage one tensor of a valid ``obj`` of a :data:`LOW_BIT_CODECS` codec with ``op``
    (one of :data:`SPARSE_DAMAGE`; an op that does not fit the codec picks one that does).
    The result must be refused with ``bad_codec`` or ``shape_mismatch``."""
    codec = obj["codec"]
    t = rng.choice([x for x in obj["tensors"] if x["shape"] and _elements(x) > 0])
    n = _elements(t)
    if codec == "int4":
        if not op.startswith("int4_"):
            op = rng.choice([o for o in SPARSE_DAMAGE if o.startswith("int4_")])
        if op == "int4_scales_nan":
            scales = np.frombuffer(t["extra"]["scales"], "<f4").copy()
            scales[rng.randrange(scales.size)] = rng.choice([np.nan, np.inf, -1.0, 1e31])
            t["extra"]["scales"] = scales.tobytes()
        elif op == "int4_scales_len":
            t["extra"]["scales"] += b"\0" * rng.choice([1, 4])
        elif op == "int4_block":
            t["params"]["block"] = rng.choice([0.0, 1.5, -4.0, 2.0**31])
        else:
            t["data"] = t["data"][:-1] if rng.random() < 0.5 else t["data"] + b"\x88"
        return
    if op.startswith("int4_"):
        op = rng.choice([o for o in SPARSE_DAMAGE if not o.startswith("int4_")])
    k = int(t["params"]["k"])
    if op == "pos_range":
        _set_positions(t, codec, varint_encode(np.array([n + rng.randrange(3)])), 1)
    elif op == "pos_dup" and n >= 2:
        _set_positions(t, codec, varint_encode(np.array([rng.randrange(n), 0])), 2)
    elif op == "k_too_big":
        _set_positions(t, codec, varint_encode(np.array([0] + [1] * n)), n + 1)
    elif op == "k_count":
        t["params"]["k"] = float(k + rng.choice([-1, 1]) if k else 1)
    elif op == "k_fraction":
        t["params"]["k"] = rng.choice([0.5, -1.0, k + 0.25])
    elif op == "varint_dangling":
        _set_positions(t, codec, b"\x80", 1)
    elif op == "varint_long":
        _set_positions(t, codec, b"\xff" * 5 + b"\x01", 1)
    elif op == "varint_overlong":
        _set_positions(t, codec, b"\x80\x00", 1)
    elif op == "varint_trailing":
        _set_positions(t, codec, varint_encode(np.array([0])) + rng.choice([b"\x80", b"\x01"]), 1)
    elif op == "bitmap_len":
        t["extra"] = {"bitmap": bitmap_bytes(np.arange(k), n) + b"\0"}
    elif op == "bitmap_pad" and n % 8:
        bitmap = bytearray(bitmap_bytes(np.arange(k), n))
        bitmap[-1] |= 0x80
        t["extra"] = {"bitmap": bytes(bitmap)}
    elif op == "both_fields":
        t["extra"] = {"bitmap": bitmap_bytes(np.arange(k), n),
                      "gaps": varint_encode(np.array([0] + [1] * (k - 1))[:k])}
    elif op == "no_positions":
        t["extra"] = {} if rng.random() < 0.5 else {"index": b"\0\0\0\0"}
    elif op == "pad_bits" and codec in ("topk-int4", "stc"):
        _set_positions(t, codec, varint_encode(np.array([0])), 1)
        t["data"] = b"\xf0" if codec == "topk-int4" else b"\x03"
    elif op == "neg_scale" and codec != "topk-f16":
        t["params"]["scale"] = rng.choice([-1.0, 1e31])
    else:  # values_count (and ops that do not fit this tensor)
        t["data"] = t["data"] + bytes(rng.choice([1, 2, 4])) if rng.random() < 0.5 or not (
            t["data"]) else t["data"][:-1]


KINDS = (
    "bytes", "field", "delete", "tensor", "semantic", "extra", "deep", "big", "signed", "sparse",
)


def fuzz_payload(rng: random.Random, base: Obj, kind: str | None = None) -> tuple[str, bytes]:
    """One mutated payload of ``base`` (a valid update map); (kind, payload)."""
    kind = kind or rng.choice(KINDS)
    obj = copy.deepcopy(base)
    if kind == "bytes":
        return kind, _byte_mutation(rng, _pack(obj))
    if kind == "deep":
        return kind, _deep_bytes(rng)
    if kind == "signed":
        return kind, _signed_mutation(rng, base)
    if kind == "field":
        field = rng.choice(_TOP_FIELDS)
        obj[field] = _field_value(rng, field, base)
    elif kind == "delete":
        for field in rng.sample(_TOP_FIELDS[:-1], rng.randint(1, 3)):
            obj.pop(field, None)
    elif kind == "tensor":
        _tensor_mutation(rng, obj)
    elif kind == "semantic":
        _semantic_mutation(rng, obj)
    elif kind == "sparse":
        codec = rng.choice(LOW_BIT_CODECS)
        nrng = np.random.default_rng(rng.getrandbits(32))
        delta = {t["name"]: nrng.normal(0, 0.05, t["shape"]).astype(np.float32)
                 for t in obj["tensors"]}
        obj["codec"] = codec
        obj["tensors"] = [t.to_map() for t in _encode(codec, delta, rng, nrng)]
        sparse_damage(rng, obj, rng.choice(SPARSE_DAMAGE))
    elif kind == "extra":
        obj[rng.choice(["x", "pickle", "__class__", ""])] = _generic_value(rng)
        if rng.random() < 0.5:
            obj["signature"] = _generic_value(rng)
    else:  # big: oversized strings, maps and lists
        op = rng.randrange(4)
        if op == 0:
            obj[rng.choice(["fleet", "device", "update_id", "codec"])] = "x" * rng.choice(
                [100, 5000, 2_000_000]
            )
        elif op == 1:
            obj["metrics"] = {f"m{i}": float(i) for i in range(rng.choice([257, 5000]))}
        elif op == 2:
            obj["tensors"][0]["shape"] = [1] * rng.choice([9, 64, 200_000])
        else:
            obj["tensors"][0]["name"] = "n" * rng.choice([129, 100_000])
    try:
        return kind, _pack(obj)
    except (ValueError, OverflowError, TypeError):  # the packer refused: damage bytes instead
        return "bytes", _byte_mutation(rng, _pack(base))


CHUNK_DAMAGE = (
    "index", "count", "total_bytes", "header_change", "data_length", "transfer", "hash",
    "oversize", "field", "delete", "bytes", "expired", "duplicate",
)


def fuzz_chunks(
    rng: random.Random, payload: bytes, max_message_bytes: int, op: str | None = None
) -> tuple[str, list[bytes]]:
    """The chunk stream of ``payload`` (in a random order) with one chunk damaged by ``op``
    (one of :data:`CHUNK_DAMAGE`); "expired" and "duplicate" keep the chunks valid (the
    caller expires the transfer between chunks / expects one payload back)."""
    from fedmq.chunks import split

    op = op or rng.choice(CHUNK_DAMAGE)
    chunks = split(payload, max_message_bytes)
    maps: list[Obj] = [
        {"v": 2, "type": "chunk", "transfer": c.transfer, "index": c.index, "count": c.count,
         "total_bytes": c.total_bytes, "data": c.data}
        for c in chunks
    ]
    order = list(range(len(maps)))
    rng.shuffle(order)
    i = rng.randrange(len(maps))
    m = maps[i]
    if op == "index":
        m["index"] = rng.choice([-1, m["count"], m["count"] + 7, 2**40, 65536])
    elif op == "count":
        m["count"] = rng.choice([0, -1, m["count"] + 1, 65537, 2**33])
    elif op == "total_bytes":
        m["total_bytes"] = rng.choice([0, -5, m["total_bytes"] + 1, m["total_bytes"] - 1])
    elif op == "header_change":  # consistent on its own, disagrees with the other chunks
        total = m["total_bytes"] + rng.randint(1, 9)
        size = -(-total // (m["count"] + 1))
        m.update(count=m["count"] + 1, total_bytes=total, index=0, data=bytes(size))
    elif op == "data_length":
        m["data"] = m["data"] + b"\0" if rng.random() < 0.5 else m["data"][:-1]
    elif op == "transfer":
        m["transfer"] = rng.choice(["", "xyz", "A" * 64, "0" * 63, 7, None, "g" * 64])
    elif op == "hash":  # every chunk names a transfer id that is not the payload's sha256
        other = "f" * 64 if m["transfer"] != "f" * 64 else "e" * 64
        for x in maps:
            x["transfer"] = other
    elif op == "oversize":
        m.update(count=1, index=0, total_bytes=2**40, data=b"x")
    elif op == "field":
        key = rng.choice(["index", "count", "total_bytes", "data", "transfer", "v", "type"])
        m[key] = rng.choice([None, "x", 1.5, [], {}, True, b"zz", -1])
    elif op == "delete":
        m.pop(rng.choice(["index", "count", "total_bytes", "data", "transfer", "v"]))
    elif op == "duplicate":
        order = order + order[: rng.randint(1, len(order))]
    out = [_pack(maps[k]) for k in order]
    if op == "bytes":
        j = rng.randrange(len(out))
        out[j] = _byte_mutation(rng, out[j])
    return op, out


# ------------------------------------------------------------------- secure aggregation

SECAGG_DAMAGE = (
    "bytes", "field", "delete", "entry", "round", "phase", "fleet", "signature", "unsigned",
    "unknown_share", "device", "deep", "big",
)


def fuzz_secagg(
    rng: random.Random, signed: bytes, sign: Callable[[bytes], bytes],
    others: tuple[bytes, ...] = (),
) -> tuple[str, bytes]:
    """One damaged secure-aggregation payload from ``signed`` (a valid signed device
    message); ``sign(body)`` signs a body with the device's real key, so body damage reaches
    the semantic checks, not only the signature check; ``others`` are the same device's
    valid messages of other phases (replayed as they are). (kind, payload)."""
    kind = rng.choice(SECAGG_DAMAGE)
    env = msgpack.unpackb(signed, raw=False)
    body: Obj = msgpack.unpackb(env["body"], raw=False)
    if kind == "bytes":
        return kind, _byte_mutation(rng, signed)
    if kind == "deep":
        return kind, _deep_bytes(rng)
    if kind == "signature":
        sig = bytearray(env["sig"])
        sig[rng.randrange(len(sig))] ^= 1 << rng.randrange(8)
        return kind, _pack({**env, "sig": bytes(sig)})
    if kind == "unsigned":
        return kind, env["body"]
    if kind == "field":
        field = rng.choice(sorted(body))
        body[field] = _generic_value(rng)
    elif kind == "delete":
        for field in rng.sample(sorted(body), rng.randint(1, 2)):
            body.pop(field)
    elif kind == "entry":  # damage one entry of a list field (shares, reveals)
        lists = [k for k, v in body.items() if isinstance(v, list) and v]
        if lists:
            entries = body[rng.choice(lists)]
            i = rng.randrange(len(entries))
            entry = list(entries[i])
            j = rng.randrange(len(entry))
            entry[j] = rng.choice([_generic_value(rng), b"\x00" * rng.choice([0, 31, 66, 300]),
                                   "z", "x/y"])
            entries[i] = entry if rng.random() < 0.8 else _generic_value(rng)
            if rng.random() < 0.2:
                entries.append(entries[0])  # a device named twice
    elif kind == "round":
        body["round"] = body["round"] + rng.choice([-1, 1, 1000])
    elif kind == "phase" and others and rng.random() < 0.7:
        return kind, rng.choice(others)
    elif kind == "phase":
        body["type"] = rng.choice(["sa_keys", "sa_shares", "sa_masked", "sa_unmask",
                                   "sa_roster", "sa_relay", "sa_survivors", "update"])
    elif kind == "fleet":
        body["fleet"] = "other"
    elif kind == "unknown_share":
        if body.get("shares"):
            body["shares"][0][0] = "nobody"
        elif body.get("reveals"):
            body["reveals"][0][0] = "nobody"
        else:
            body["device"] = "nobody"
    elif kind == "device":
        body["device"] = rng.choice(["dev-2", "", "a+b", "x" * 65])
    else:  # big
        body[rng.choice(["fleet", "device", "epoch"])] = "x" * rng.choice([65, 5000])
    try:
        raw = _pack(body)
    except (ValueError, OverflowError, TypeError):
        return "bytes", _byte_mutation(rng, signed)
    return kind, _pack({"v": 2, "type": "signed", "body": raw, "sig": sign(raw)})
# ------------------------------------------------------------------------- downlink

DOWNLINK_DAMAGE = (
    "bytes", "field", "delete", "tensor", "sparse", "base", "codec", "deltas", "extra",
)
_DELTA_FIELDS = ("v", "type", "fleet", "version", "base_version", "round", "model_id", "codec",
                 "tensors", "created_at", "epoch")
_INDEX_FIELDS = ("v", "type", "fleet", "version", "round", "model_id", "codec",
                 "snapshot_version", "snapshot_bytes", "deltas", "metrics", "created_at",
                 "epoch")


def valid_delta_map(
    rng: random.Random, template: Mapping[str, tuple[int, ...]], fleet: str, version: int,
    codec: str | None = None,
) -> Obj:
    """A valid model delta (the msgpack map) of ``version`` for ``template``."""
    codec = codec or rng.choice(codecs.codec_names())
    nrng = np.random.default_rng(rng.getrandbits(32))
    delta = {n: nrng.normal(0, 0.05, s).astype(np.float32) for n, s in template.items()}
    msg = ModelDelta(fleet, version, version - 1, version, "m", codec,
                     tuple(_encode(codec, delta, rng, nrng)), 1.7e9, "e" * 16)
    obj = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(obj, dict)
    return obj


def valid_index_map(rng: random.Random, fleet: str, version: int) -> Obj:
    snap = rng.randint(max(0, version - 5), version)
    deltas = tuple((v, rng.randint(1, 10**6)) for v in range(max(1, version - 8), version + 1))
    msg = ModelIndex(fleet, version, version, "m", rng.choice(codecs.codec_names()), snap,
                     rng.randint(1, 10**7), deltas, {"accuracy": 0.5}, 1.7e9, "e" * 16)
    obj = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(obj, dict)
    return obj


def fuzz_downlink(rng: random.Random, base: Obj, kind: str | None = None) -> tuple[str, bytes]:
    """One mutated payload of a valid model delta or index map; (kind, payload)."""
    kind = kind or rng.choice(DOWNLINK_DAMAGE)
    obj = copy.deepcopy(base)
    is_delta = obj.get("type") == "model-delta"
    fields = _DELTA_FIELDS if is_delta else _INDEX_FIELDS
    if kind == "bytes":
        return kind, _byte_mutation(rng, _pack(obj))
    if kind == "field":
        obj[rng.choice(fields)] = _generic_value(rng)
    elif kind == "delete":
        for field in rng.sample(fields, rng.randint(1, 3)):
            obj.pop(field, None)
    elif kind == "tensor" and is_delta:
        _tensor_mutation(rng, obj)
    elif kind == "sparse" and is_delta:
        codec = rng.choice(LOW_BIT_CODECS)
        nrng = np.random.default_rng(rng.getrandbits(32))
        delta = {t["name"]: nrng.normal(0, 0.05, t["shape"]).astype(np.float32)
                 for t in obj["tensors"]}
        obj["codec"] = codec
        obj["tensors"] = [t.to_map() for t in _encode(codec, delta, rng, nrng)]
        sparse_damage(rng, obj, rng.choice(SPARSE_DAMAGE))
    elif kind == "base":
        key = "base_version" if is_delta else "snapshot_version"
        obj[key] = rng.choice([obj["version"], obj["version"] + 1, obj["version"] - 2, -1,
                               2**62 + 1])
        if rng.random() < 0.3:
            obj["version"] = 0
    elif kind == "codec":
        obj["codec"] = rng.choice(["int9", "", "float64", "x" * 17, "INT8", 8])
    elif kind == "deltas" and not is_delta:
        d = obj["deltas"]
        op = rng.randrange(6)
        if op == 0 and d:
            d.reverse() if len(d) > 1 else d.append(d[0])
        elif op == 1 and d:
            del d[rng.randrange(len(d))]
        elif op == 2:
            obj["deltas"] = [[v, 1] for v in range(1, rng.choice([1025, 5000]))]
        elif op == 3 and d:
            d[rng.randrange(len(d))] = rng.choice([[1], [1, 2, 3], "x", [-1, 5], [2, 0],
                                                   [True, 1], [1.5, 2]])
        elif op == 4 and d:
            d[-1][0] = obj["version"] + rng.randint(1, 3)
        else:
            obj["deltas"] = _generic_value(rng)
    else:  # extra fields, or a mutation that does not fit this message: damage bytes
        if kind == "extra":
            obj[rng.choice(["x", "pickle", "__class__", ""])] = _generic_value(rng)
        else:
            return "bytes", _byte_mutation(rng, _pack(obj))
    try:
        return kind, _pack(obj)
    except (ValueError, OverflowError, TypeError):
        return "bytes", _byte_mutation(rng, _pack(base))
# -- pruning masks (fedmq.prune.mask) ---------------------------------------------------------
MASK_DAMAGE = (
    "bytes", "unknown_tensor", "duplicate", "size", "short_bits", "long_bits", "padding",
    "kept", "all_pruned", "extra_key", "missing_key", "field_type", "version", "not_list",
)


def fuzz_mask(rng: random.Random, mask_bytes: bytes, op: str | None = None) -> tuple[str, bytes]:
    """One damaged copy of a valid pruning mask's bytes (at least one tensor); (op, bytes)."""
    op = op or rng.choice(MASK_DAMAGE)
    if op == "bytes":
        return op, _byte_mutation(rng, mask_bytes)
    obj = msgpack.unpackb(mask_bytes, raw=False)
    entries = obj["tensors"]
    e = rng.choice(entries)
    n = e["size"]
    if op == "unknown_tensor":
        e["name"] = e["name"] + "_x"
    elif op == "duplicate":
        entries.append(copy.deepcopy(e))
    elif op == "size":
        e["size"] = rng.choice([0, n - 1, n + 1, -n, 2**40, n * 8])
    elif op == "short_bits":
        e["bits"] = e["bits"][: rng.randrange(len(e["bits"]))]
    elif op == "long_bits":
        e["bits"] = e["bits"] + bytes(rng.randint(1, 9))
    elif op == "padding":
        if n % 8 == 0:  # no padding bits to set: make the size disagree instead
            e["size"] = n - 1
        else:
            bits = bytearray(e["bits"])
            bits[-1] |= 0x80
            e["bits"] = bytes(bits)
    elif op == "kept":
        e["kept"] = e["kept"] + rng.choice([-1, 1, n, -e["kept"] - 1])
    elif op == "all_pruned":
        e["bits"] = bytes(len(e["bits"]))
        e["kept"] = 0
    elif op == "extra_key":
        e[rng.choice(["positions", "dtype", "k"])] = 1
    elif op == "missing_key":
        del e[rng.choice(["name", "size", "kept", "bits"])]
    elif op == "field_type":
        key = rng.choice(["name", "size", "kept", "bits"])
        e[key] = rng.choice([None, 1.5, True, "x", b"x", [1], {"a": 1}, -1])
    elif op == "version":
        obj["mask"] = rng.choice([0, 2, "1", None, True])
    elif op == "not_list":
        obj["tensors"] = rng.choice([{}, "x", 3, None])
    return op, _pack(obj)


# -- site gateways' partials (fedmq.wire.SitePartial) ----------------------------------------
SITE_PARTIAL_DAMAGE = ("bytes", "field", "delete", "devices", "partial", "signed", "extra")
_SITE_FIELDS = ("v", "type", "fleet", "epoch", "round", "base_version", "gateway", "partial_id",
                "devices", "partial", "created_at")


def valid_site_partial_map(
    rng: random.Random, template: Mapping[str, tuple[int, ...]], fleet: str, n: int,
) -> Obj:
    """A valid site partial (the msgpack map): ``n`` devices' updates folded exactly."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    acc = FixedPointSum(template)
    for _ in range(n):
        codec = rng.choice(["float32", "int8", "float16"])
        delta = {k: nrng.normal(0, 0.05, s).astype(np.float32) for k, s in template.items()}
        acc.fold(_encode(codec, delta, rng, nrng), codec, float(rng.randint(1, 500)))
    devices = tuple(sorted(f"d{i:04d}" for i in range(n)))
    msg = SitePartial(fleet, "e" * 16, 3, 2, "gw-1", "gw-1-3-abc", devices, acc.to_bytes(),
                      1.7e9)
    obj = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(obj, dict)
    return obj


def _partial_damage(rng: random.Random, blob: bytes) -> bytes:
    """The serialised FixedPointSum damaged: bytes, or a field of its map."""
    if rng.random() < 0.4:
        return _byte_mutation(rng, blob)
    obj = msgpack.unpackb(blob, raw=False)
    key = rng.choice(["accumulator", "format", "shapes", "scale_bits", "count", "weight_q",
                      "bound", "sum"])
    if key == "sum" and rng.random() < 0.6:
        name = rng.choice(sorted(obj["sum"]))
        raw = obj["sum"][name]
        obj["sum"][name] = rng.choice([raw[:-8], raw + b"\0" * 8, b"",
                                       b"\xff" * len(raw), raw[::-1]])
    elif key == "bound" and rng.random() < 0.6:
        name = rng.choice(sorted(obj["bound"]))
        obj["bound"][name] = rng.choice([-1.0, float("inf"), float("nan"), 2.0**63, True])
    elif key in ("count", "weight_q") and rng.random() < 0.6:
        obj[key] = rng.choice([0, -1, obj[key] + 1, 2**64 - 1, 1.5])
    else:
        obj[key] = _generic_value(rng)
    try:
        return _pack(obj)
    except (ValueError, OverflowError, TypeError):
        return _byte_mutation(rng, blob)


def fuzz_site_partial(
    rng: random.Random, base: Obj, kind: str | None = None,
) -> tuple[str, bytes]:
    """One mutated payload of a valid site partial map (bare or signed); (kind, payload)."""
    kind = kind or rng.choice(SITE_PARTIAL_DAMAGE)
    obj = copy.deepcopy(base)
    if kind == "bytes":
        return kind, _byte_mutation(rng, _pack(obj))
    if kind == "field":
        obj[rng.choice(_SITE_FIELDS)] = _generic_value(rng)
    elif kind == "delete":
        for field in rng.sample(_SITE_FIELDS, rng.randint(1, 3)):
            obj.pop(field, None)
    elif kind == "devices":
        d = obj["devices"]
        op = rng.randrange(5)
        if op == 0:
            d.reverse()
        elif op == 1:
            d.append(d[0])
        elif op == 2:
            d.pop()
        elif op == 3:
            d[rng.randrange(len(d))] = rng.choice(["a/b", "+", "", "x" * 65, 7, None])
        else:
            obj["devices"] = [f"d{i:06d}" for i in range(rng.choice([0, 100_001]))]
    elif kind == "partial":
        obj["partial"] = _partial_damage(rng, obj["partial"])
    elif kind == "signed":
        body = _pack(obj)
        sig = bytes(rng.getrandbits(8) for _ in range(64))
        envelope = {"v": 2, "type": "signed", "body": body, "sig": sig}
        key = rng.choice(["body", "sig", "type", "v", None])
        if key == "body":
            envelope["body"] = _byte_mutation(rng, body)
        elif key is not None:
            envelope[key] = _generic_value(rng)
        return kind, _pack(envelope)
    else:
        obj[rng.choice(["x", "pickle", "__class__", ""])] = _generic_value(rng)
    try:
        return kind, _pack(obj)
    except (ValueError, OverflowError, TypeError):
        return "bytes", _byte_mutation(rng, _pack(base))
