"""``fedmq broker {init,add-device,remove-device,add-gateway,remove-gateway,add-service,
remove-service,list,gateway-conf}``: argument parsing and output."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq_ops.broker.files import write_file
from fedmq_ops.broker.gateway import GatewayBrokerSettings, render_gateway_conf
from fedmq_ops.broker.provision import (
    PASSWORD_ENV,
    LoginOptions,
    add_device,
    add_gateway,
    add_service,
    init_broker,
    list_devices,
    list_gateways,
    list_services,
    remove_device,
    remove_gateway,
    remove_service,
    service_config,
)
from fedmq_ops.broker.settings import (
    SERVICE_ROLES,
    SHARD_WORKER,
    BrokerLayout,
    BrokerSettings,
    ack_login,
)
from fedmq_ops.broker.state import load_settings

__all__ = ["add_parser"]


_RELOAD_HINT = ("reload the broker to apply: `kill -HUP $(pidof mosquitto)` or "
                "`docker compose kill -s HUP mosquitto`")


def _owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError as exc:
        raise ConfigError(f"--owner must be UID[:GID] in numbers, got {value!r}") from exc


def _cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    base = BrokerSettings()
    if (root / "broker.json").exists():
        base = load_settings(root)  # keep earlier choices unless flags override them
    changes: dict[str, Any] = {}
    for key in ("fleet", "hostname"):
        value = getattr(args, key)
        if value:
            changes[f"{key}s"] = tuple(dict.fromkeys(value))
    for key in ("topic_prefix", "tls_port", "config_root", "data_dir", "days", "bind_clientid",
                "max_queued_messages", "max_queued_bytes", "max_message_bytes", "monitor",
                "decryptor", "require_client_cert"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.health_port is not None:
        changes["health_port"] = args.health_port or None
    if args.local:
        if args.config_root or args.data_dir:
            raise ConfigError("--local sets the paths itself: drop --config-root/--data-dir")
        changes["config_root"] = str(root.resolve())
        changes["data_dir"] = str((root / "data").resolve()) + "/"
    settings = replace(base, **changes)
    result = init_broker(root, settings, renew_server_cert=args.renew_server_cert,
                         owner=_owner(args.owner))
    layout = BrokerLayout(root)
    print(f"broker directory {root}: config {layout.conf}, CA {layout.ca_crt}")
    for ident in result.passwords:
        print(f"new password for {ident!r} saved in {layout.credentials(ident)} (mode 0600)")
    if not result.passwords:
        print("existing CA, keys and passwords kept; ACL and config re-rendered")
    return 0


def _add(args: argparse.Namespace, kind: str, password: str | None) -> str | None:
    options = LoginOptions(fleet=args.fleet, password=password, rotate=args.rotate,
                           client_cert=args.cert, save_credentials=not args.no_save,
                           owner=_owner(args.owner))
    if kind == "service":
        return add_service(Path(args.dir), args.name, args.role, **options)
    add = add_gateway if kind == "gateway" else add_device
    return add(Path(args.dir), args.name, **options)


def _cmd_add(args: argparse.Namespace) -> int:
    password = args.password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    kind = args.broker_command.removeprefix("add-")
    new = _add(args, kind, password)
    layout = BrokerLayout(Path(args.dir))
    if new is None:
        print(f"{args.name} exists; password unchanged (use --rotate for a new one)")
    elif args.password is None and not args.password_stdin:
        print(f"{args.name} password (shown once): {new}")
    else:
        print(f"{args.name} password set")
    if new is not None and not args.no_save:
        saved = (layout.credentials(args.name) if kind == "device"
                 else layout.gateway_password(args.name))
        print(f"credentials: {saved} (mode 0600)")
    if kind == "gateway":
        print(f"on the gateway: `fedmq broker gateway-conf --gateway {args.name} "
              f"--remote-username {args.name} --remote-password-file FILE --cafile ca.crt ...`")
    if kind == "service":
        print(f"in the {args.role}'s TOML config (the password in [mqtt] password or the "
              f"environment, {PASSWORD_ENV[args.role]}):")
        print(service_config(args.name, args.role), end="")
    if layout.client_crt(args.name).exists():
        print(f"client certificate: {layout.client_crt(args.name)}, "
              f"key {layout.client_key(args.name)}")
    print(_RELOAD_HINT)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    kind = args.broker_command.removeprefix("remove-")
    remove = {"gateway": remove_gateway, "service": remove_service}.get(kind, remove_device)
    if remove(Path(args.dir), args.name, owner=_owner(args.owner)):
        print(f"removed {args.name}; {_RELOAD_HINT}")
    else:
        print(f"{args.name} was not a {kind} of {args.dir}; nothing to do")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for name, fleet in list_devices(Path(args.dir)).items():
        print(f"{name}\t{fleet}")
    for name, fleet in list_gateways(Path(args.dir)).items():
        print(f"{name}\t{fleet}\tgateway")
    for name, (role, fleet) in list_services(Path(args.dir)).items():
        print(f"{name}\t{fleet}\t{role}")
        if role == SHARD_WORKER:
            print(f"{ack_login(name)}\t{fleet}\t{role} {name}'s acks")
    return 0


def _cmd_gateway_conf(args: argparse.Namespace) -> int:
    password = ""
    if args.remote_password_file:
        try:
            password = Path(args.remote_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.remote_password_file}: "
                              f"{exc.strerror or exc}") from exc
    settings = GatewayBrokerSettings(
        fleet=args.fleet, gateway=args.gateway, cloud_host=args.cloud_host,
        cloud_port=args.cloud_port, topic_prefix=args.topic_prefix,
        listen_port=args.listen_port, listen_address=args.listen_address,
        password_file=args.password_file, acl_file=args.acl_file, data_dir=args.data_dir,
        run_as=args.run_as, site_devices=args.site_devices, outage_rounds=args.outage_rounds,
        max_queued_messages=args.max_queued_messages,
        max_message_bytes=args.max_message_bytes, autosave_interval=args.autosave_interval,
        cafile=args.cafile, certfile=args.certfile, keyfile=args.keyfile,
        remote_username=args.remote_username, remote_password=password,
        restart_base=args.restart_timeout[0], restart_cap=args.restart_timeout[1],
    )
    # 0600 when it holds the bridge's password
    write_file(Path(args.out), render_gateway_conf(settings), 0o600 if password else 0o644)
    print(f"gateway broker config {args.out}: bridge {settings.cloud_host}:"
          f"{settings.cloud_port}, bridge state on {settings.notification_topic}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``fedmq broker {init,add-device,remove-device,add-gateway,remove-gateway,
    add-service,remove-service,list,gateway-conf}``."""
    p = subparsers.add_parser(
        "broker", help="create and manage the production Mosquitto files (TLS, ACL, users)",
        description="Create a CA, the broker's TLS certificate, a password file, a per-user "
        "ACL and mosquitto.conf in one directory, and add or remove devices. "
        "See docs/broker.md.",
    )
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dir", required=True, type=Path, help="the broker directory")
        sp.add_argument("--owner", metavar="UID[:GID]",
                        help="owner of server.key and passwd, group of DIR and certs/, owner "
                        "of the --local data/ (1883:1883 for the eclipse-mosquitto image; "
                        "needs root)")

    i = sub.add_parser("init", help="create the CA, certificates, users, ACL and config",
                       description="Idempotent: keeps the CA, keys and passwords that exist, "
                       "re-renders the ACL and mosquitto.conf.")
    common(i)
    i.add_argument("--fleet", action="append", help="fleet served (repeatable; default "
                   "'default')")
    i.add_argument("--hostname", action="append", help="DNS name or IP of the broker for the "
                   "certificate (repeatable; localhost and 127.0.0.1 are always included)")
    i.add_argument("--days", type=int, help="validity of server and client certificates "
                   "(default 825)")
    i.add_argument("--tls-port", type=int, help="TLS listener port (default 8883)")
    i.add_argument("--health-port", type=int, help="plaintext 127.0.0.1 listener port "
                   "(default 1883; 0 = none)")
    i.add_argument("--topic-prefix", help="topic prefix before fl/ (default none)")
    i.add_argument("--config-root", help="where the broker sees DIR (default "
                   "/mosquitto/config, the compose mount)")
    i.add_argument("--data-dir", help="persistence directory (default /mosquitto/data/)")
    i.add_argument("--local", action="store_true", help="render paths for running mosquitto "
                   "on this host from DIR (config root = DIR, data = DIR/data)")
    i.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=None,
                   help="a read-only 'monitor' user (status, model, round, $SYS)")
    i.add_argument("--decryptor", action=argparse.BooleanOptionalAction, default=None,
                   help="a 'decryptor' user for `fedmq he decrypt` (reads he/sum, the only "
                   "writer of he/mean)")
    i.add_argument("--require-client-cert", action=argparse.BooleanOptionalAction,
                   default=None, help="require a CA-signed client certificate in addition "
                   "to the password")
    i.add_argument("--bind-clientid", action=argparse.BooleanOptionalAction, default=None,
                   help="client id := username (default on): one connection per identity, "
                   "no session takeover by another user")
    i.add_argument("--max-queued-messages", type=int, help="per-client queue (default 100000)")
    i.add_argument("--max-queued-bytes", type=int, help="per-client queue bytes (default 1 GiB; "
                   "0 = unlimited)")
    i.add_argument("--max-message-bytes", type=int, help="largest message a client may "
                   "publish: the float32 model's size plus a margin (default 16 MiB); it also "
                   "caps what a device can leave retained on its topics")
    i.add_argument("--renew-server-cert", action="store_true",
                   help="issue a new server certificate even if the current one is fine")
    i.set_defaults(func=_cmd_init)

    def adder(action: str, kind: str, text: str, name_help: str, saved: str) -> None:
        a = sub.add_parser(action, help=f"add a {kind} (prints its password once)",
                           description=f"{text} Idempotent: an existing {kind} keeps its "
                           "password unless --password or --rotate.")
        a.add_argument("name", help=name_help)
        common(a)
        if kind == "service":
            a.add_argument("--role", required=True, choices=SERVICE_ROLES,
                           help="what it runs: its ACL block grants only that")
        a.add_argument("--fleet", help="its fleet (default: the first fleet of the broker)")
        g = a.add_mutually_exclusive_group()
        g.add_argument("--password", help="use this password (visible in the process list; "
                       "prefer --password-stdin)")
        g.add_argument("--password-stdin", action="store_true", help="read the password from "
                       "the first line of stdin")
        g.add_argument("--rotate", action="store_true", help=f"give an existing {kind} a new "
                       "random password")
        a.add_argument("--cert", action="store_true", help="also issue a client certificate")
        a.add_argument("--no-save", action="store_true", help=f"do not write {saved} (print "
                       "the password only)")
        a.set_defaults(func=_cmd_add)
        r = sub.add_parser(f"remove-{kind}",
                           help=f"remove a {kind} (password, ACL, certificate)")
        r.add_argument("name", help=name_help)
        common(r)
        r.set_defaults(func=_cmd_remove)

    adder("add-device", "device", "Add a device user with its ACL block.",
          "device id = MQTT username", "credentials/NAME.env")
    adder("add-gateway", "gateway", "Enrol a site gateway's bridge login on this (cloud) "
          "broker: its ACL block grants exactly the topics its bridge carries (its partial "
          "up; its answer, the round and the model down). See docs/scaling.md, \"Site "
          "gateways\".", "gateway name = its bridge's MQTT username (gateway-conf "
          "--gateway/--remote-username)", "credentials/NAME.pass")
    adder("add-service", "service", "Give one process of the sharded ingest (a shard worker, "
          "the shard coordinator, the partial receiver) its own login, whose ACL block grants "
          "only what its role does; a shard worker also gets NAME-acks (same password) for "
          "its ack connection. Prints the config lines it needs. See docs/broker.md.",
          "service name = its MQTT username", "credentials/NAME.pass")

    gw = sub.add_parser("gateway-conf", help="a site gateway's mosquitto.conf, bridged to the "
                        "cloud broker", description="Render the site broker's config: its "
                        "listener, persistence, queue limits and the bridge that carries the "
                        "gateway's partials up and the round, model and answers down. See "
                        "docs/scaling.md, \"Site gateways\".")
    d = GatewayBrokerSettings("f", "g", "h")
    gw.add_argument("--out", required=True, type=Path, help="the mosquitto.conf to write")
    gw.add_argument("--fleet", required=True)
    gw.add_argument("--gateway", required=True, help="the gateway's name (its enrolment in "
                    "the cloud's gateway registry)")
    gw.add_argument("--cloud-host", required=True, help="the cloud broker")
    gw.add_argument("--cloud-port", type=int, default=d.cloud_port)
    gw.add_argument("--topic-prefix", default="")
    gw.add_argument("--listen-port", type=int, default=d.listen_port)
    gw.add_argument("--listen-address", default="", help="bind address (default: all)")
    gw.add_argument("--password-file", default="", help="site users (default: anonymous)")
    gw.add_argument("--acl-file", default="")
    gw.add_argument("--data-dir", default=d.data_dir, help="persistence directory")
    gw.add_argument("--run-as", default=d.run_as)
    gw.add_argument("--site-devices", type=int, default=d.site_devices,
                    help="devices at the site (queue budget)")
    gw.add_argument("--outage-rounds", type=int, default=d.outage_rounds,
                    help="rounds a cloud outage may last without loss (queue budget)")
    gw.add_argument("--max-queued-messages", type=int, default=d.max_queued_messages)
    gw.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    gw.add_argument("--autosave-interval", type=int, default=d.autosave_interval)
    gw.add_argument("--cafile", default="", help="CA of the cloud broker's TLS certificate")
    gw.add_argument("--certfile", default="", help="the bridge's client certificate")
    gw.add_argument("--keyfile", default="")
    gw.add_argument("--remote-username", default="", help="the bridge's login at the cloud")
    gw.add_argument("--remote-password-file", default="", help="file holding its password "
                    "(the rendered config is then 0600)")
    gw.add_argument("--restart-timeout", type=int, nargs=2, metavar=("BASE", "CAP"),
                    default=(d.restart_base, d.restart_cap),
                    help="bridge reconnect backoff in seconds")
    gw.set_defaults(func=_cmd_gateway_conf)

    ls = sub.add_parser("list", help="list the devices, gateways and services and their "
                        "fleets")
    ls.add_argument("--dir", required=True, type=Path, help="the broker directory")
    ls.set_defaults(func=_cmd_list)
