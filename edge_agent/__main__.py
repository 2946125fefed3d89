"""``python -m edge_agent [options]``: run the edge agent (same as ``fedmq agent``)."""

from __future__ import annotations

import sys

from edge_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
