"""The command line of a service configured by a strict TOML file: ``--config FILE`` plus one
flag per setting, each overriding its setting (docs/scaling.md). Shared by the sharded ingest
(:mod:`aggregator.shard_config`) and the site gateway's services (:mod:`aggregator.site_config`);
the file itself is read by :func:`fedmq.config.load_config`, which refuses unknown tables and
keys naming the closest valid one."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["Flag", "add_config_flags", "flag_overrides"]

#: (flag, setting, type, help); the setting is a field name or ``<table>.<key>``.
Flag = tuple[str, str, Any, str]


def add_config_flags(
    parser: argparse.ArgumentParser, flags: tuple[Flag, ...], *, tables: str,
    subcommand: bool = False,
) -> None:
    """``--config FILE`` (a TOML with ``tables``) and ``flags``. ``subcommand``: the parser is
    a role of ``fedmq aggregator``, whose own options must not be reset by it."""
    default = argparse.SUPPRESS if subcommand else None
    parser.add_argument("--config", metavar="FILE", default=default,
                        help=f"TOML with {tables} tables (docs/scaling.md); flags override it")
    for flag, dest, kind, text in flags:
        parser.add_argument(flag, dest=dest, type=kind, default=default, help=text,
                            metavar=flag[2:].upper().replace("-", "_"))


def flag_overrides(args: argparse.Namespace, flags: tuple[Flag, ...]) -> dict[str, Any]:
    """The settings the flags in ``args`` give (``None``: not given, the file's value stays)."""
    return {dest: getattr(args, dest, None) for _, dest, _, _ in flags}
