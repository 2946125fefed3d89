"""MQTT topic layout (one fleet = one federation); see docs/protocol.md."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmq.errors import ConfigError

__all__ = ["Topics", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_name(value: str, what: str) -> str:
    """Fleet and device ids are single topic levels: no wildcards, slashes or spaces."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet, optionally under a prefix (tests use one per test)."""

    fleet: str
    prefix: str = ""

    def __post_init__(self) -> None:
        validate_name(self.fleet, "fleet")
        if self.prefix and (self.prefix.endswith("/") or "+" in self.prefix or "#" in self.prefix):
            raise ConfigError(f"topic prefix {self.prefix!r} must not end in '/' or hold wildcards")

    @property
    def base(self) -> str:
        root = f"{self.prefix}/fl" if self.prefix else "fl"
        return f"{root}/{self.fleet}"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    def update(self, device: str) -> str:
        return f"{self.base}/update/{validate_name(device, 'device')}"

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{validate_name(device, 'device')}"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{validate_name(device, 'device')}"

    @property
    def update_wildcard(self) -> str:
        return f"{self.base}/update/+"

    @property
    def status_wildcard(self) -> str:
        return f"{self.base}/status/+"

    # Secure aggregation (docs/privacy.md): devices send on secagg/in/<device>; the
    # aggregator broadcasts (retained) on secagg/out and relays shares on secagg/out/<device>.
    def secagg_in(self, device: str) -> str:
        return f"{self.base}/secagg/in/{validate_name(device, 'device')}"

    @property
    def secagg_in_wildcard(self) -> str:
        return f"{self.base}/secagg/in/+"

    @property
    def secagg_out(self) -> str:
        return f"{self.base}/secagg/out"

    def secagg_relay(self, device: str) -> str:
        return f"{self.base}/secagg/out/{validate_name(device, 'device')}"

    def secagg_device_of(self, topic: str) -> str | None:
        """The device of a ``secagg/in/<device>`` topic of this fleet, else None."""
        head = f"{self.base}/secagg/in/"
        rest = topic[len(head) :] if topic.startswith(head) else ""
        return rest if rest and "/" not in rest else None

    # Site gateways (docs/scaling.md): a gateway's signed partial goes up on
    # gateway/<gw>/partial (bridged out), the cloud's answer comes down on gateway/<gw>/ack.
    def gateway_partial(self, gateway: str) -> str:
        return f"{self.base}/gateway/{validate_name(gateway, 'gateway')}/partial"

    def gateway_ack(self, gateway: str) -> str:
        return f"{self.base}/gateway/{validate_name(gateway, 'gateway')}/ack"

    def gateway_bridge(self, gateway: str) -> str:
        """The site broker's retained bridge state ("1" up, "0" down; Mosquitto's
        notification topic, set by the generated gateway config)."""
        return f"{self.base}/gateway/{validate_name(gateway, 'gateway')}/bridge"

    @property
    def gateway_partial_wildcard(self) -> str:
        return f"{self.base}/gateway/+/partial"

    def gateway_of(self, topic: str) -> str | None:
        """The gateway of a ``gateway/<gw>/partial`` topic of this fleet, else None."""
        head = f"{self.base}/gateway/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        return parts[0] if len(parts) == 2 and parts[1] == "partial" and parts[0] else None

    def shared_updates(self, group: str) -> str:
        """MQTT v5 shared subscription for several aggregator workers."""
        return f"$share/{validate_name(group, 'group')}/{self.update_wildcard}"

    def device_of(self, topic: str) -> str | None:
        """The device id of an update/ack/status topic of this fleet, else None."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[0] not in ("update", "ack", "status") or not parts[1]:
            return None
        return parts[1]
