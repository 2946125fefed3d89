"""``python -m fedmq_ops`` is the ``fedmq`` command."""

import sys

from fedmq_ops.cli import main

sys.exit(main())
