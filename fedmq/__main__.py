"""``python -m fedmq`` is the ``fedmq`` command."""

import sys

from fedmq.cli import main

sys.exit(main())
