"""The worked examples of docs/architecture.md run as written (and leave no registration)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.update.codecs import codec_names, unregister
from fedmq.update.strategies import strategy_names, unregister_strategy

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _section_code(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"### {title}")
    end = text.find("\n## ", start)
    section = text[start:end if end >= 0 else None]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python example under {title!r}"
    return "\n".join(blocks)


def _run(title: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"architecture_example_{title}"}
    exec(compile(_section_code(title), f"{DOC}:{title}", "exec"), namespace)
    return namespace


def test_add_a_codec_example_runs() -> None:
    try:
        ns = _run("Add a codec")
        assert "topk" in codec_names()
        np.testing.assert_array_equal(ns["mean"], [[0.0, -2.0, 0.0], [1.0, 0.0, 0.0]])
        assert [t.count for t in ns["update"].tensors] == [2]
    finally:
        unregister("topk")
    assert "topk" not in codec_names()


def test_add_a_strategy_example_runs() -> None:
    try:
        ns = _run("Add a strategy (and a wrapper)")
        assert "my_median" in strategy_names()
        assert ns["strategy"].name == "prox(my_median)"
        np.testing.assert_array_equal(ns["new_weights"]["w"], [2.0, 0.5, 0.0])
        assert ns["config"].params == {"mu": 0.01}
    finally:
        unregister_strategy("my_median")
    assert "my_median" not in strategy_names()


def test_the_round_policy_example_is_run_by_the_policy_tests() -> None:
    # tests/unit/test_round_policy.py executes that block and drives the coordinator with it.
    assert "### Add a round policy" in DOC.read_text()
    assert "_doc_example" in (Path(__file__).parent / "test_round_policy.py").read_text()
