"""The broker-directory commands: init, add, remove and list devices and site gateways."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from fedmq.errors import ConfigError
from fedmq.topics import validate_name
from fedmq_ops.broker.acl import render_acl
from fedmq_ops.broker.certs import (
    cert_pem,
    issue_client_cert,
    issue_server_cert,
    key_pem,
    load_cert,
    load_key,
    make_ca,
    server_cert_ok,
)
from fedmq_ops.broker.conf import render_mosquitto_conf
from fedmq_ops.broker.files import DIR_MODES, ensure_dir, write_file, write_if_changed
from fedmq_ops.broker.lock import locked
from fedmq_ops.broker.passwords import format_passwd, hash_password, new_password
from fedmq_ops.broker.settings import (
    AGGREGATOR_USER,
    DECRYPTOR_USER,
    MONITOR_USER,
    RESERVED_USERS,
    SERVICE_ROLES,
    SHARD_WORKER,
    BrokerLayout,
    BrokerSettings,
    BrokerState,
    ack_login,
)
from fedmq_ops.broker.state import load_state, read_passwd, save_state

__all__ = [
    "PASSWORD_ENV",
    "InitResult",
    "LoginOptions",
    "add_device",
    "add_gateway",
    "add_service",
    "init_broker",
    "list_devices",
    "list_gateways",
    "list_services",
    "remove_device",
    "remove_gateway",
    "remove_service",
    "service_config",
]

log = logging.getLogger(__name__)


def _credentials_text(state: BrokerState, name: str, password: str) -> str:
    """Only the identity: host, port and fleet stay in the TOML config, which the
    environment would override (a compose aggregator dials ``mosquitto``, not the DNS name)."""
    s = state.settings
    extra: list[str] = []
    if name == AGGREGATOR_USER:
        prefix, fleets = "FEDMQ_AGGREGATOR_MQTT_", ", ".join(s.fleets)
    elif name == MONITOR_USER:
        prefix, fleets = "FEDMQ_MONITOR_", ", ".join(s.fleets)
    elif name == DECRYPTOR_USER:  # `fedmq he decrypt` reads FEDMQ_DECRYPTOR_MQTT_PASSWORD
        prefix, fleets = "FEDMQ_DECRYPTOR_MQTT_", ", ".join(s.fleets)
    else:
        prefix, fleets = "FEDMQ_AGENT_MQTT_", state.devices[name]
        extra.append(f"FEDMQ_AGENT_DEVICE_ID={name}")
    lines = [
        f"# MQTT login of {name!r} (fleet {fleets}) for the fedmq broker:",
        f"# TLS port {s.tls_port}, server names {', '.join(s.hostnames)}, CA certs/ca.crt.",
        "# Secret: deliver it, then delete this file. Works as a compose env_file or a",
        "# systemd EnvironmentFile.",
        *extra,
        f"{prefix}USERNAME={name}",
        f"{prefix}PASSWORD={password}",
    ]
    return "\n".join(lines) + "\n"


def _secure_dirs(layout: BrokerLayout, settings: BrokerSettings,
                 owner: tuple[int, int] | None) -> None:
    """Explicit modes (whatever the umask) for DIR, certs/ and a local data/: the broker's
    group (``owner``) may enter DIR and certs/; the broker owns data/, where it saves
    ``mosquitto.db`` after dropping root."""
    group = (-1, owner[1]) if owner is not None else None
    ensure_dir(layout.root, DIR_MODES[""], group)
    ensure_dir(layout.certs, DIR_MODES["certs"], group)
    for name in ("private", "credentials", "clients"):
        if (layout.root / name).exists():
            ensure_dir(layout.root / name, DIR_MODES[name])
    if Path(settings.data_dir.rstrip("/")) == layout.data.resolve():  # --local
        ensure_dir(layout.data, DIR_MODES["data"], owner)
        if owner is not None:
            for saved in layout.data.glob("mosquitto.db*"):
                os.chown(saved, *owner, follow_symlinks=False)


def _render_all(layout: BrokerLayout, state: BrokerState, passwd: dict[str, str],
                owner: tuple[int, int] | None) -> None:
    for ack, worker in state.ack_logins().items():  # the worker's password, always
        if worker in passwd:
            passwd[ack] = passwd[worker]
    write_file(layout.passwd, format_passwd(passwd), 0o600, owner, keep_group_read=True)
    write_if_changed(layout.acl, render_acl(state.settings, state.devices, state.gateways,
                                            state.services), 0o644)
    write_if_changed(layout.conf, render_mosquitto_conf(state.settings), 0o644)
    save_state(layout, state)


def _password_only(state: BrokerState, name: str) -> bool:
    """A gateway's or a service's credentials are its password alone (an env file for
    the others)."""
    return _kind_of(state, name) not in (None, "device")


def _credentials_file(layout: BrokerLayout, state: BrokerState, name: str) -> Path:
    """A gateway's or a service's password alone, else an env file."""
    return (layout.gateway_password(name) if _password_only(state, name)
            else layout.credentials(name))


def _set_password(layout: BrokerLayout, state: BrokerState, passwd: dict[str, str], name: str,
                  password: str | None, save: bool) -> str:
    password = password if password is not None else new_password()
    passwd[name] = hash_password(password)
    cred = _credentials_file(layout, state, name)
    if save:
        text = (password + "\n" if _password_only(state, name)
                else _credentials_text(state, name, password))
        write_file(cred, text, 0o600)
    elif cred.exists():
        cred.unlink()  # it would hold the old password
    return password


@dataclass(frozen=True)
class InitResult:
    written: tuple[str, ...]  # files created or rewritten
    passwords: Mapping[str, str]  # identities given a new password by this run


def init_broker(
    root: Path,
    settings: BrokerSettings,
    renew_server_cert: bool = False,
    owner: tuple[int, int] | None = None,
) -> InitResult:
    """Create what is missing in ``root``; keep the CA, keys and passwords already there.

    ``owner`` (uid, gid) is given to the files the broker process reads that are secret
    (server.key, passwd): 1883:1883 for the eclipse-mosquitto image.
    """
    layout = BrokerLayout(Path(root))
    created: list[str] = []
    passwords: dict[str, str] = {}
    with locked(layout.root, create=True):
        _secure_dirs(layout, settings, owner)
        state = BrokerState(settings)
        if layout.state.exists():
            old = load_state(layout)
            state = BrokerState(settings, old.devices, old.gateways, old.services)
            orphans = {d: f for d, f in old.logins().items() if f not in settings.fleets}
            if orphans:
                raise ConfigError(
                    f"devices/gateways/services {sorted(orphans)} belong to fleets not in "
                    f"{settings.fleets}; remove them first or keep their fleets"
                )

        if layout.ca_key.exists() != layout.ca_crt.exists():
            raise ConfigError(
                f"only one of {layout.ca_key} and {layout.ca_crt} exists; restore the other "
                "or delete both to make a new CA (every client then needs the new ca.crt)"
            )
        if layout.ca_key.exists():
            ca_key, ca_cert = load_key(layout.ca_key), load_cert(layout.ca_crt)
        else:
            ca_key, ca_cert = make_ca(days=settings.ca_days)
            write_file(layout.ca_key, key_pem(ca_key), 0o600)
            write_file(layout.ca_crt, cert_pem(ca_cert), 0o644)
            created += [str(layout.ca_key), str(layout.ca_crt)]

        keep = (
            not renew_server_cert
            and layout.server_crt.exists()
            and layout.server_key.exists()
            and server_cert_ok(load_cert(layout.server_crt), ca_cert, settings.hostnames)
        )
        if not keep:
            key, cert = issue_server_cert(ca_key, ca_cert, settings.hostnames, settings.days)
            write_file(layout.server_key, key_pem(key), 0o600, owner, keep_group_read=True)
            write_file(layout.server_crt, cert_pem(cert), 0o644)
            created += [str(layout.server_crt), str(layout.server_key)]
        elif owner is not None:
            os.chown(layout.server_key, *owner)

        passwd = read_passwd(layout)
        optional = {MONITOR_USER: settings.monitor, DECRYPTOR_USER: settings.decryptor}
        wanted = {AGGREGATOR_USER} | {ident for ident, on in optional.items() if on}
        for ident in sorted(wanted):
            if ident not in passwd:
                passwords[ident] = _set_password(layout, state, passwd, ident, None, True)
                created.append(str(layout.credentials(ident)))
        for ident, on in optional.items():
            if not on and ident in passwd:
                del passwd[ident]
                layout.credentials(ident).unlink(missing_ok=True)
        stale = set(passwd) - wanted - set(state.logins())
        if stale:
            log.warning("password file users without an ACL block (they can connect but "
                        "do nothing): %s", ", ".join(sorted(stale)))
        _render_all(layout, state, passwd, owner)
        created += [str(p) for p in (layout.passwd, layout.acl, layout.conf)]
    log.info("broker files in %s", layout.root)
    return InitResult(tuple(dict.fromkeys(created)), passwords)


_KINDS = ("device", "gateway", *SERVICE_ROLES)


def _users(state: BrokerState, kind: str) -> dict[str, str]:
    """The name -> fleet map of ``kind`` (devices, site gateways' bridge logins, or the
    services of a role), created when missing."""
    if kind == "device":
        return state.devices
    return state.gateways if kind == "gateway" else state.services.setdefault(kind, {})


def _kind_of(state: BrokerState, name: str) -> str | None:
    """What login ``name`` is (a device, a gateway or a service role), else None."""
    if name in state.devices:
        return "device"
    if name in state.gateways:
        return "gateway"
    return next((r for r, users in state.services.items() if name in users), None)


def _remover(kind: str) -> str:
    return "remove-service" if kind in SERVICE_ROLES else f"remove-{kind}"


def _check_name(state: BrokerState, name: str, kinds: tuple[str, ...],
                removing: bool = False) -> None:
    """Refuse ``name`` when it is another kind's login, or a shard worker's ack login (or,
    for a new shard worker, when its ack login is taken)."""
    worker = state.ack_logins().get(name)
    if worker is not None:
        raise ConfigError(f"{name} is the ack login of shard worker {worker}: it is added "
                          f"and removed with it (remove-service {worker})")
    other = _kind_of(state, name)
    if other is not None and other not in kinds:
        raise ConfigError(f"{name} is a {other}, not a {' or '.join(kinds)}: use "
                          f"{_remover(other)}" if removing
                          else f"{name} is a {other} of this broker: one MQTT login has one "
                          f"role ({_remover(other)} it first)")
    if not removing and kinds == (SHARD_WORKER,):
        ack = validate_name(ack_login(name), "shard worker's ack login")
        if _kind_of(state, ack) is not None:
            raise ConfigError(f"shard worker {name}'s ack login {ack} is taken")


def _add_user(root: Path, name: str, kind: str, fleet: str | None = None,
              password: str | None = None, rotate: bool = False, client_cert: bool = False,
              save_credentials: bool = True, owner: tuple[int, int] | None = None) -> str | None:
    validate_name(name, kind)
    if name in RESERVED_USERS:
        raise ConfigError(f"{name!r} is reserved for the {name} identity")
    if kind not in _KINDS:
        raise ConfigError(f"unknown role {kind!r} (known: {', '.join(SERVICE_ROLES)})")
    if password is not None and rotate:
        raise ConfigError("give either a password or rotate, not both")
    layout = BrokerLayout(Path(root))
    with locked(layout.root):
        state = load_state(layout)
        _check_name(state, name, (kind,))
        users = _users(state, kind)
        fleet = fleet or users.get(name) or state.settings.fleets[0]
        if fleet not in state.settings.fleets:
            raise ConfigError(f"fleet {fleet!r} is not served by this broker "
                              f"({', '.join(state.settings.fleets)}); see `init --fleet`")
        known = users.get(name)
        if known is not None and known != fleet:
            raise ConfigError(f"{kind} {name} already belongs to fleet {known!r}; "
                              "remove it first to move it")
        passwd = read_passwd(layout)
        users[name] = fleet
        new: str | None = None
        if name not in passwd or password is not None or rotate:
            new = _set_password(layout, state, passwd, name, password, save_credentials)
            log.info("%s %s %s (fleet %s)",
                     "added" if known is None else "new password for", kind, name, fleet)
        else:
            log.info("%s %s exists (fleet %s); password unchanged (use --rotate)",
                     kind, name, fleet)
        if client_cert and not layout.client_crt(name).exists():
            ca_key, ca_cert = load_key(layout.ca_key), load_cert(layout.ca_crt)
            key, cert = issue_client_cert(ca_key, ca_cert, name, state.settings.days)
            write_file(layout.client_key(name), key_pem(key), 0o600)
            write_file(layout.client_crt(name), cert_pem(cert), 0o644)
            log.info("client certificate %s", layout.client_crt(name))
        _render_all(layout, state, passwd, owner)
    return new


class LoginOptions(TypedDict, total=False):
    """The options of :func:`add_device`, :func:`add_gateway` and :func:`add_service`."""

    fleet: str | None  # default: the login's fleet, else the broker's first fleet
    password: str | None  # default: a new random one (None: keep an existing login's)
    rotate: bool  # a new random password for an existing login
    client_cert: bool  # also issue a client certificate (kept when one exists)
    save_credentials: bool  # write the credentials file (default True)
    owner: tuple[int, int] | None


def add_device(root: Path, name: str, **options: Unpack[LoginOptions]) -> str | None:
    """Add (or update) device ``name``; returns its new password, or None if unchanged.

    Re-adding an existing device changes nothing unless ``password`` or ``rotate`` is given;
    ``client_cert`` issues a client certificate when the device has none.
    """
    return _add_user(root, name, "device", **options)


def add_gateway(root: Path, name: str, **options: Unpack[LoginOptions]) -> str | None:
    """Enrol site gateway ``name``'s bridge login (docs/scaling.md, "Site gateways"): its ACL
    block grants exactly what its bridge carries (``gateway.bridge_topics``). Like
    :func:`add_device` otherwise; the password alone is saved in ``credentials/NAME.pass``
    (``fedmq broker gateway-conf --remote-password-file``)."""
    return _add_user(root, name, "gateway", **options)


def _remove_user(root: Path, name: str, kinds: tuple[str, ...],
                 owner: tuple[int, int] | None) -> bool:
    validate_name(name, kinds[0])
    if name in RESERVED_USERS:
        raise ConfigError(f"{name!r} is not a {' or '.join(kinds)}")
    layout = BrokerLayout(Path(root))
    with locked(layout.root):
        state = load_state(layout)
        _check_name(state, name, kinds, removing=True)
        kind = _kind_of(state, name)
        cred = _credentials_file(layout, state, name)
        passwd = read_passwd(layout)
        if kind == SHARD_WORKER:  # only then: NAME-acks may be another login
            passwd.pop(ack_login(name), None)
        kind = kind or kinds[0]
        found = _users(state, kind).pop(name, None) is not None
        found = passwd.pop(name, None) is not None or found
        for p in (cred, layout.client_crt(name), layout.client_key(name)):
            if p.exists():
                p.unlink()
                found = True
        _render_all(layout, state, passwd, owner)
    return found


def remove_device(root: Path, name: str, owner: tuple[int, int] | None = None) -> bool:
    """Remove ``name``'s password, ACL block, credentials and client certificate.

    Returns False when there was nothing to remove. The broker applies it on SIGHUP.
    """
    return _remove_user(root, name, ("device",), owner)


def remove_gateway(root: Path, name: str, owner: tuple[int, int] | None = None) -> bool:
    """Remove site gateway ``name``'s bridge login, as :func:`remove_device`."""
    return _remove_user(root, name, ("gateway",), owner)


def list_gateways(root: Path) -> dict[str, str]:
    return dict(sorted(load_state(BrokerLayout(Path(root))).gateways.items()))


def list_devices(root: Path) -> dict[str, str]:
    return dict(sorted(load_state(BrokerLayout(Path(root))).devices.items()))


def add_service(root: Path, name: str, role: str, **options: Unpack[LoginOptions]) -> str | None:
    """Enrol service ``name`` of the sharded ingest (``role``: a shard worker, the shard
    coordinator or the partial receiver; docs/scaling.md, "Sharded ingest") with its own
    login, whose ACL block grants only what that role does (``acl.SERVICE_GRANTS``). A shard
    worker also gets its ack connection's login, :func:`~fedmq_ops.broker.settings.ack_login`
    (same password, only the devices' acks). Like :func:`add_gateway` otherwise: the password
    alone is saved in ``credentials/NAME.pass``; :func:`service_config` is the config."""
    return _add_user(root, name, role, **options)


def remove_service(root: Path, name: str, owner: tuple[int, int] | None = None) -> bool:
    """Remove service ``name``'s login (a shard worker's ack login with it), as
    :func:`remove_device`."""
    return _remove_user(root, name, SERVICE_ROLES, owner)


def list_services(root: Path) -> dict[str, tuple[str, str]]:
    """Service -> (role, fleet)."""
    state = load_state(BrokerLayout(Path(root)))
    return dict(sorted((name, (role, fleet)) for role, users in state.services.items()
                       for name, fleet in users.items()))


#: Where each role's service reads its MQTT password from the environment.
PASSWORD_ENV = {SHARD_WORKER: "FEDMQ_AGGREGATOR_MQTT_PASSWORD",
                "shard-coordinator": "FEDMQ_AGGREGATOR_MQTT_PASSWORD",
                "partial-receiver": "FEDMQ_RECEIVER_MQTT_PASSWORD"}


def service_config(name: str, role: str) -> str:
    """The TOML lines service ``name`` of ``role`` needs to log in (its password goes in
    ``[mqtt] password`` or the environment, never in this text)."""
    lines = [f"# MQTT login of the {role} {name}; its password is in credentials/{name}.pass",
             "[mqtt]", f'username = "{name}"']
    if role == SHARD_WORKER:
        lines += ["", "[shard]", f'ack_username = "{ack_login(name)}"']
    return "\n".join(lines) + "\n"
