"""``fedmq keygen`` (on a device) and ``fedmq enroll`` (on the aggregator side).

fedmq keygen --key /var/lib/fedmq-agent/device.key      # prints the public key
fedmq keygen --key ... --force                          # a new key over the old one
fedmq enroll DEVICE_ID PUBLIC_KEY_HEX --registry /var/lib/fedmq/devices.json
fedmq enroll DEVICE_ID NEW_KEY_HEX --registry ... --replace
fedmq enroll --list --registry ...
fedmq enroll --revoke DEVICE_ID --registry ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError, SecurityError
from fedmq.signing import Registry, create_key, load_key, load_or_create_key

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def _keygen(args: argparse.Namespace) -> int:
    if args.force and (args.key.exists() or args.key.is_symlink()):
        try:
            old: str | None = Registry.fingerprint(load_key(args.key, False).public_hex)
        except SecurityError:
            old = None  # unreadable or not a key: replaced all the same
        key = create_key(args.key, overwrite=True)
        log.warning("replaced the key in %s (was %s, now %s): enrol the new public key with "
                    "`fedmq enroll DEVICE KEY --replace`", args.key, old or "unreadable",
                    Registry.fingerprint(key.public_hex))
    else:
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
    old = reg.enroll(args.device, args.public_key, replace=args.replace)
    if old == args.public_key:
        print(f"{args.device} is already enrolled with this key in {args.registry}")
    elif old is not None:
        print(f"replaced the key of {args.device} in {args.registry}")
    else:
        print(f"enrolled {args.device} in {args.registry}")
    return 0


def add_parser(subparsers: Any) -> None:
    k = subparsers.add_parser(
        "keygen",
        help="create (or show) this device's Ed25519 signing key",
        description="Create the device's Ed25519 key file (mode 0600) if it does not exist "
        "and print its public key (hex) for enrolment on the aggregator. An existing key "
        "is never overwritten without --force, and one that others can read is refused.",
    )
    k.add_argument("--key", type=Path, required=True, help="path of the private key file")
    k.add_argument("--force", action="store_true", help="make a new key even if the file "
                   "exists (the old key is gone; enrol the new one with --replace)")
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
    e.add_argument("--replace", action="store_true", help="replace the key of a device that "
                   "is already enrolled (logs the old and new fingerprints)")
    e.set_defaults(func=_enroll)
