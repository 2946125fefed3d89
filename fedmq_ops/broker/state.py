"""Load and save ``broker.json`` and read the password file of a broker directory."""

from __future__ import annotations

import json
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq_ops.broker.files import write_if_changed
from fedmq_ops.broker.passwords import parse_passwd
from fedmq_ops.broker.settings import SERVICE_ROLES, BrokerLayout, BrokerSettings, BrokerState

__all__ = ["load_settings", "load_state", "read_passwd", "save_state"]

_STATE_VERSION = 1


def load_state(layout: BrokerLayout) -> BrokerState:
    if not layout.state.exists():
        raise ConfigError(f"{layout.root} is not a broker directory: run `fedmq broker init` "
                          f"(no {layout.state.name})")
    try:
        data = json.loads(layout.state.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {layout.state}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise ConfigError(f"{layout.state} has an unknown format")
    settings = BrokerSettings.from_json(data.get("settings", {}))
    devices = {str(k): str(v) for k, v in dict(data.get("devices", {})).items()}
    gateways = {str(k): str(v) for k, v in dict(data.get("gateways", {})).items()}
    services = {str(role): {str(k): str(v) for k, v in dict(users).items()}
                for role, users in dict(data.get("services", {})).items()}
    unknown = set(services) - set(SERVICE_ROLES)
    if unknown:
        raise ConfigError(f"{layout.state}: unknown service roles {sorted(unknown)} "
                          f"(known: {', '.join(SERVICE_ROLES)})")
    return BrokerState(settings, devices, gateways, services)


def load_settings(root: Path) -> BrokerSettings:
    return load_state(BrokerLayout(Path(root))).settings


def save_state(layout: BrokerLayout, state: BrokerState) -> None:
    doc: dict[str, object] = {"version": _STATE_VERSION, "settings": state.settings.to_json(),
                              "devices": dict(sorted(state.devices.items()))}
    if state.gateways:  # absent until the first gateway: older files stay byte-identical
        doc["gateways"] = dict(sorted(state.gateways.items()))
    services = {role: dict(sorted(users.items()))
                for role, users in sorted(state.services.items()) if users}
    if services:  # likewise until the first service
        doc["services"] = services
    write_if_changed(layout.state, json.dumps(doc, indent=2) + "\n", 0o644)


def read_passwd(layout: BrokerLayout) -> dict[str, str]:
    return parse_passwd(layout.passwd.read_text()) if layout.passwd.exists() else {}
