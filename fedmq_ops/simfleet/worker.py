"""One process of a sharded simulated fleet:
``python -m fedmq_ops.simfleet.worker SPEC.json INDEX OUT.json`` (started by
:func:`fedmq_ops.simfleet.runner.run_fleet`)."""

from __future__ import annotations

import sys

from fedmq_ops.simfleet.runner import shard_main

if __name__ == "__main__":
    sys.exit(shard_main())
