"""``fedmq broker``: the files a production Mosquitto needs (TLS, passwords, ACL, config).

    fedmq broker init --dir DIR [--fleet F ...] [--hostname H ...] [--days N] [--monitor]
                      [--decryptor]
    fedmq broker add-device NAME --dir DIR [--fleet F] [--password P | --rotate] [--cert]
    fedmq broker remove-device NAME --dir DIR
    fedmq broker add-gateway NAME --dir DIR [--fleet F] [--password-stdin | --rotate] [--cert]
    fedmq broker remove-gateway NAME --dir DIR
    fedmq broker add-service NAME --dir DIR --role shard-worker|shard-coordinator|partial-receiver
                             [--fleet F] [--password-stdin | --rotate]
    fedmq broker remove-service NAME --dir DIR
    fedmq broker list --dir DIR
    fedmq broker gateway-conf --out FILE --fleet F --gateway NAME --cloud-host H ...

One module per job: ``settings`` (broker.json, the directory layout), ``conf``
(mosquitto.conf), ``acl``, ``passwords`` ($7$ hashes), ``certs`` (CA, server and client
certificates), ``files`` (writes with explicit modes), ``lock``, ``state``, ``provision``
(init / add / remove / list) and ``cli``.

Layout of ``DIR`` (see docs/broker.md)::

    mosquitto.conf                 rendered config; paths point under --config-root
    passwd                         Mosquitto password file ($7$ PBKDF2-SHA512)      0600
    acl                            per-user ACL (one block per identity)            0644
    certs/ca.crt                   the fleet CA certificate (give it to every client)
    certs/server.crt, server.key   the broker's certificate and key                 key 0600
    private/ca.key                 CA signing key: NOT for the broker, keep offline 0600
    credentials/NAME.env           FEDMQ_AGENT_MQTT_* / FEDMQ_AGGREGATOR_MQTT_* login 0600
    credentials/NAME.pass          a site gateway bridge's or a service's password 0600
    clients/NAME.crt, NAME.key     optional client certificates (--cert)            key 0600
    broker.json                    settings, the device, gateway, service -> fleet maps

Every identity gets an explicit ACL block naming its own topics: Mosquitto's ``pattern``
lines (``%u``) would apply to *every* user, so the read-only ``monitor`` identity could
publish ``fl/<fleet>/update/monitor``. Everything is idempotent: existing keys, the CA and
passwords are kept unless a rotation is asked for; the ACL and the config are re-rendered.
"""

from __future__ import annotations

from fedmq_ops.broker.acl import render_acl
from fedmq_ops.broker.certs import issue_client_cert, issue_server_cert, make_ca
from fedmq_ops.broker.cli import add_parser
from fedmq_ops.broker.conf import render_mosquitto_conf
from fedmq_ops.broker.passwords import (
    PBKDF2_ITERATIONS,
    format_passwd,
    hash_password,
    parse_passwd,
    verify_password,
)
from fedmq_ops.broker.provision import (
    InitResult,
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
    AGGREGATOR_USER,
    DECRYPTOR_USER,
    MONITOR_USER,
    PACKET_OVERHEAD,
    RESERVED_USERS,
    SERVICE_ROLES,
    BrokerLayout,
    BrokerSettings,
    ack_login,
)
from fedmq_ops.broker.state import load_settings

__all__ = [
    "AGGREGATOR_USER",
    "DECRYPTOR_USER",
    "MONITOR_USER",
    "PACKET_OVERHEAD",
    "PBKDF2_ITERATIONS",
    "RESERVED_USERS",
    "SERVICE_ROLES",
    "BrokerLayout",
    "BrokerSettings",
    "InitResult",
    "add_device",
    "ack_login",
    "add_gateway",
    "add_parser",
    "add_service",
    "format_passwd",
    "hash_password",
    "init_broker",
    "issue_client_cert",
    "issue_server_cert",
    "list_devices",
    "list_gateways",
    "list_services",
    "load_settings",
    "make_ca",
    "parse_passwd",
    "remove_device",
    "remove_gateway",
    "remove_service",
    "render_acl",
    "render_mosquitto_conf",
    "service_config",
    "verify_password",
]
