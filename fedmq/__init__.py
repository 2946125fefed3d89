"""fedmq: federated learning for fleets of small devices over MQTT.

The ``fedmq`` package is the shared core without network I/O: wire format, codecs,
accumulators and strategies (``fedmq.update``), signing, topics, errors, configuration,
model bundles and data. Its one exception is ``fedmq.net`` (the MQTT client and local
servers), the floor above the core. The device daemon lives in ``edge_agent``, the cloud
service in ``aggregator`` and the ``fedmq`` command in ``fedmq_ops`` (docs/architecture.md).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
