"""fedmq: federated learning for fleets of small devices over MQTT.

The ``fedmq`` package is the shared core without network I/O: wire format, codecs,
aggregation math, round state, configuration, model bundles and data. The device daemon
lives in ``edge_agent`` and the cloud service in ``aggregator``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
