"""``fedmq he keygen`` and ``fedmq he decrypt``: the decryptor role of homomorphic aggregation
(docs/privacy.md, "Homomorphic encryption").

- ``keygen --out DIR``: a new CKKS key pair for one deployment: ``DIR/public.ctx`` (public
  key only: for devices' ``he_context`` and the aggregator's) and ``DIR/secret.ctx`` (mode
  0600, the operator's: it never goes to a device or the aggregator). An existing secret is
  never overwritten.
- ``decrypt --secret DIR/secret.ctx --fleet F``: the decryptor service. Subscribes to the
  retained ``fl/<fleet>/he/sum``, answers each acceptable sum with its mean on
  ``fl/<fleet>/he/mean`` (retained) under the rules of
  :class:`fedmq.privacy.he_decrypt.Decryptor`, until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError, FedmqError
from fedmq.fsutil import atomic_write
from fedmq.privacy.he import HEContext, HEParams, keygen
from fedmq.privacy.he_decrypt import Decryptor, he_topics
from fedmq.topics import Topics

__all__ = ["add_parser", "cmd_decrypt", "cmd_keygen", "write_keys"]

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    he = subparsers.add_parser("he", help="homomorphic aggregation: keys and the decryptor")
    sub = he.add_subparsers(dest="he_command", metavar="{keygen,decrypt}", required=True)
    kg = sub.add_parser("keygen", help="make a deployment's CKKS key pair")
    kg.add_argument("--out", required=True, type=Path, help="directory for the two contexts")
    kg.add_argument("--poly-degree", type=int, default=HEParams.poly_degree)
    kg.add_argument("--scale-bits", type=int, default=HEParams.scale_bits)
    kg.set_defaults(func=cmd_keygen)
    dec = sub.add_parser("decrypt", help="run the decryptor: answer encrypted sums")
    dec.add_argument("--secret", required=True, type=Path, help="DIR/secret.ctx of keygen")
    dec.add_argument("--fleet", required=True)
    dec.add_argument("--host", default="127.0.0.1")
    dec.add_argument("--port", type=int, default=1883)
    dec.add_argument("--protocol", default="5")
    dec.add_argument("--topic-prefix", default="")
    dec.add_argument("--username")
    dec.add_argument("--tls-ca")
    dec.add_argument("--state", type=Path, default=None,
                     help="file of the rounds decrypted (default: beside --secret)")
    dec.add_argument("--min-updates", type=int, default=2,
                     help="refuse sums of fewer updates (default 2)")
    dec.set_defaults(func=cmd_decrypt)
    return he


def write_keys(out: Path, params: HEParams) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = out / "public.ctx", out / "secret.ctx"
    if secret_path.exists():
        raise ConfigError(f"{secret_path} exists: refusing to replace a deployment's secret key")
    public, secret = keygen(params)
    atomic_write(secret_path, secret, mode=0o600)
    atomic_write(public_path, public, mode=0o644)
    return public_path, secret_path


def cmd_keygen(args: argparse.Namespace) -> int:
    params = HEParams(poly_degree=args.poly_degree, scale_bits=args.scale_bits)
    public_path, secret_path = write_keys(args.out, params)
    print(f"public context {public_path} ({public_path.stat().st_size} bytes): give it to the "
          "devices (he_context) and the aggregator (he_context)")
    print(f"secret context {secret_path} ({secret_path.stat().st_size} bytes, mode 0600): "
          "the decryptor's only; never copy it to a device or the aggregator")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    from fedmq.net.mqtt import MqttSettings, connect, make_client  # paho: only to run it

    try:
        data = args.secret.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--secret {args.secret}: {exc}") from exc
    he = HEContext.load(data, secret=True, what=f"--secret {args.secret}")
    state = args.state or args.secret.with_name("decrypted-rounds.json")
    decryptor = Decryptor(he, args.fleet, state, args.min_updates)
    topics = Topics(args.fleet, args.topic_prefix)
    sum_topic, mean_topic = he_topics(topics.base)
    settings = MqttSettings(
        host=args.host, port=args.port, protocol=args.protocol,
        client_id=f"fedmq-decryptor-{args.fleet}", username=args.username,
        password=os.environ.get("FEDMQ_DECRYPTOR_MQTT_PASSWORD"), tls_ca=args.tls_ca,
    )
    inbox: queue.Queue[bytes] = queue.Queue()
    stop = threading.Event()
    client = make_client(settings)
    client.on_connect = lambda c, *_a: c.subscribe(sum_topic, 1)
    client.on_message = lambda _c, _u, msg: inbox.put(bytes(msg.payload))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: stop.set())
    try:
        connect(client, settings, asynchronous=False)
    except OSError as exc:
        raise FedmqError(f"cannot reach the broker at {args.host}:{args.port}: {exc}") from exc
    client.loop_start()
    log.info("decryptor for fleet %s: waiting for sums on %s (N=%d)", args.fleet, sum_topic,
             he.params.poly_degree)
    try:
        while not stop.is_set():
            try:
                payload = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if not payload:
                continue
            answer = decryptor.handle(payload)
            if answer is not None:
                client.publish(mean_topic, answer, qos=1, retain=True)
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
