"""Embedded MQTT 3.1.1 broker (amqtt) for `fedmq demo` on machines without Mosquitto.

    python -m fedmq.net.amqtt_broker --port 1883

Development only: anonymous, no TLS, loopback. Clients must use MQTT 3.1.1 with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

__all__ = ["main", "serve"]


async def serve(port: int, host: str = "127.0.0.1") -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}",
                                  "max_connections": 1000}},
        "sys_interval": 0,
        "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
        "topic-check": {"enabled": False},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.host))


if __name__ == "__main__":
    main()
