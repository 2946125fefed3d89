"""``fedmq keygen`` (on a device) and ``fedmq enroll`` (on the aggregator side).

fedmq keygen --key /var/lib/fedmq-agent/device.key      # prints the public key
fedmq enroll DEVICE_ID PUBLIC_KEY_HEX --registry /var/lib/fedmq/devices.json
fedmq enroll --list --registry ...
fedmq enroll --revoke DEVICE_ID --registry ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq.signing import Registry, load_or_create_key

__all__ = ["add_parser"]


def _keygen(args: argparse.Namespace) -> int:
    key = load_or_create_key(args.key)
    print(key.public_hex)
    return 0


def _enroll(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    if args.list:
        for device, pub in sorted(reg.devices().items()):
            print(f"{device}\t{pub}")
        return 0
    if args.revoke:
        found = reg.revoke(args.revoke)
        print(f"revoked {args.revoke}" if found else f"{args.revoke} was not enrolled")
        return 0 if found else 1
    if not args.device or not args.public_key:
        raise ConfigError("enroll needs DEVICE_ID and PUBLIC_KEY (or --list / --revoke)")
    reg.enroll(args.device, args.public_key)
    print(f"enrolled {args.device} in {args.registry}")
    return 0


def add_parser(subparsers: Any) -> None:
    k = subparsers.add_parser(
        "keygen",
        help="create (or show) this device's Ed25519 signing key",
        description="Create the device's Ed25519 key file (mode 0600) if it does not exist "
        "and print its public key (hex) for enrolment on the aggregator.",
    )
    k.add_argument("--key", type=Path, required=True, help="path of the private key file")
    k.set_defaults(func=_keygen)
    e = subparsers.add_parser(
        "enroll",
        help="enrol a device's public key in the aggregator's registry",
        description="Add, list or revoke devices in the registry the aggregator checks "
        "update signatures against (its `registry` setting).",
    )
    e.add_argument("device", nargs="?", help="device id (its MQTT username / client id)")
    e.add_argument("public_key", nargs="?", help="hex public key printed by `fedmq keygen`")
    e.add_argument("--registry", type=Path, required=True, help="registry JSON file")
    e.add_argument("--list", action="store_true", help="list enrolled devices")
    e.add_argument("--revoke", metavar="DEVICE", help="remove a device")
    e.set_defaults(func=_enroll)
