"""docs/operations.md quotes the start-up and connection lines the services really write
(issue 8 asks for a troubleshooting row for every hardening case, findings 5-7 and the
metrics bind address included).

Each fragment must appear in the troubleshooting page and, literally, in the module that
logs it, so a reworded message fails here until the page follows. The exact lines are
asserted against real processes in tests/integration/test_connection_failures.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
_DOC = _ROOT / "docs" / "operations.md"

# (fragment of the log line, the source file that writes it)
LINES = [
    # finding 5: strict config, both services
    ("unknown table [", "fedmq/config.py"),
    ("unknown key ", "fedmq/config.py"),
    ("is outside any table", "fedmq/config.py"),
    ("unknown setting", "fedmq/config.py"),
    # finding 7: TLS files, one line before any connection
    (": no such file", "fedmq/net/mqtt.py"),
    ("not a PEM file", "fedmq/net/mqtt.py"),
    # finding 6: connection failures
    ("cannot use the broker at ", "fedmq/net/mqtt.py"),
    ("TLS handshake failed", "fedmq/net/mqtt.py"),
    ("TLS certificate not accepted", "fedmq/net/mqtt.py"),
    ("(check mqtt.host and mqtt.tls_ca)", "fedmq/net/mqtt.py"),
    ("the broker refused the connection", "fedmq/net/mqtt.py"),
    ("(check mqtt.username, mqtt.password and the broker's ACL)", "fedmq/net/mqtt.py"),
    ("connection refused (is the broker running and listening on this port?)",
     "fedmq/net/mqtt.py"),
    ("the connection closed before the broker answered", "fedmq/net/mqtt.py"),
    ("the broker did not accept a message on", "fedmq/net/mqtt.py"),
    ("disconnected from the broker", "aggregator/service.py"),
    ("disconnected from the broker", "edge_agent/agent.py"),
    # finding 8: the metrics exporter's bind address
    ("metrics on http://", "aggregator/metrics.py"),
]


@pytest.mark.parametrize(("fragment", "source"), LINES)
def test_operations_page_quotes_the_line(fragment: str, source: str) -> None:
    assert fragment in (_ROOT / source).read_text(), f"{source} no longer writes {fragment!r}"
    assert fragment in _DOC.read_text(), f"docs/operations.md has no row for {fragment!r}"
