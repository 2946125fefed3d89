"""The fedmq edge agent: the daemon a device runs to take part in a federation.

``EdgeAgent(config).run()`` connects to the broker, follows the global model and the round
announcements, trains locally with LiteRT and publishes quantized updates (see
``docs/protocol.md``). Importing this package is cheap: the submodules load on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig, load_agent_config

__all__ = ["AgentConfig", "EdgeAgent", "load_agent_config"]

_LAZY = {
    "EdgeAgent": "edge_agent.agent",
    "AgentConfig": "edge_agent.config",
    "load_agent_config": "edge_agent.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
