"""The open-file limit a many-connection process needs (one descriptor per MQTT client)."""

from __future__ import annotations

import logging
import resource

__all__ = ["raise_nofile"]

log = logging.getLogger(__name__)


def raise_nofile(wanted: int | None = None) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (default: the hard limit), never
    above the hard limit. Returns the (soft, hard) limits now in force; children started
    afterwards (a local Mosquitto, shard processes) inherit them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None or hard == resource.RLIM_INFINITY else min(wanted, hard)
    if wanted is not None and hard != resource.RLIM_INFINITY and wanted > hard:
        log.warning("open-file limit: %d wanted, but the hard limit is %d", wanted, hard)
    if target != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard
