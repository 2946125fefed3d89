"""Data-source plugins: the ``plugin:`` source, loading the callable (module:function and
entry points), checking what it returns, and the edge core skipping a round on bad data
(real LiteRT trainer on digits-mlp, real state and outbox files)."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from fedmq.data.local import LocalData, LocalDataConfig, PluginData, parse_source
from fedmq.data.plugin import (
    ENTRY_POINT_GROUP,
    Examples,
    InputSpec,
    PluginDataError,
    PluginSource,
    check_examples,
    load_plugin,
)
from fedmq.errors import ConfigError, DataError
from fedmq.models.spec import load_bundle
from fedmq.wire import decode_status
from tests.unit.test_agent_core import BUNDLE, DEVICE, Device, model_msg, round_msg, updates

SPEC = InputSpec((64,), "float32", 10)  # digits-mlp's input


def good(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.random((n, 64)).astype(np.float64), (np.arange(n) % 10).astype(np.int64)


def _with_nan() -> tuple[np.ndarray, np.ndarray]:
    x, y = good()
    x[3, 7] = np.nan
    x[5, 0] = np.inf
    return x, y


# (case, what the plugin returns, the message's tail)
BAD: list[tuple[str, Any, str]] = [
    ("not a pair", good()[0], "must return (x, y), got array (12, 64) float64"),
    ("triple", (*good(), 1), "must return (x, y), got a tuple of 3"),
    ("x a list", (good()[0].tolist(), good()[1]), "x must be a numpy array, got list"),
    ("wrong shape", (np.zeros((12, 8, 8)), good()[1]),
     "x has shape (12, 8, 8), the model takes (N, 64)"),
    ("y 2-D", (good()[0], good()[1].reshape(12, 1)), "y must be 1-D (N,), got shape (12, 1)"),
    ("lengths", (good()[0], good()[1][:5]), "x has 12 examples but y has 5 labels"),
    ("empty", (np.zeros((0, 64)), np.zeros(0, np.int64)), "returned no examples"),
    ("too many", good(101), "returned 101 examples, more than the limit of 100"),
    ("strings", (good()[0].astype(str), good()[1]), "x has dtype <U32, not castable to float32"),
    ("complex", (good()[0].astype(np.complex64), good()[1]),
     "x has dtype complex64, not castable to float32"),
    ("nan", _with_nan(), "x holds 2 non-finite value(s) (NaN or inf)"),
    ("overflow", (good()[0] * 1e300, good()[1]) , "non-finite value(s) (NaN or inf)"),
    ("float labels", (good()[0], good()[1].astype(np.float32)),
     "y must hold integer labels, got dtype float32"),
    ("label too big", (good()[0], good()[1] + 1), "labels must lie in [0, 10), got [1, 10]"),
    ("negative label", (good()[0], good()[1] - 1), "labels must lie in [0, 10), got [-1, 8]"),
]


@pytest.mark.parametrize(("case", "result", "message"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_examples_are_refused_with_what_is_wrong(case: str, result: Any, message: str) -> None:
    with pytest.raises(PluginDataError) as err:
        check_examples(result, SPEC, 100, "mypkg:load")
    assert str(err.value).startswith("data plugin mypkg:load: ")
    assert message in str(err.value)


def test_good_examples_come_back_float32_and_int32() -> None:
    x, y = good()
    x32, y32 = check_examples(Examples(x, y), SPEC, 100, "p")
    assert x32.dtype == np.float32 and y32.dtype == np.int32
    np.testing.assert_array_equal(x32, x.astype(np.float32))
    np.testing.assert_array_equal(y32, y)
    ints = check_examples((np.ones((2, 64), np.uint8), np.array([0, 9])), SPEC, 100, "p")
    assert ints[0].dtype == np.float32 and ints[0].sum() == 128


# ---------------------------------------------------------------------- source strings


def test_plugin_source_strings() -> None:
    src = parse_source("plugin:mypkg.sensors:load_round?num_classes=4&path=/x.csv&limit=9")
    assert (src.kind, src.location) == ("plugin", "mypkg.sensors:load_round")
    assert dict(src.options) == {"num_classes": 4, "path": "/x.csv", "limit": 9}
    assert parse_source("plugin:sensors?num_classes=2").location == "sensors"
    for bad, why in [
        ("plugin:mypkg:load", "needs num_classes=N"),
        ("plugin:my-pkg:load?num_classes=2", "expected module:function"),
        ("plugin:mypkg:?num_classes=2", "expected module:function"),
        ("plugin:?num_classes=2", "missing path after 'plugin:'"),
        ("plugin:mypkg:load?num_classes=two", "bad value num_classes='two'"),
        ("plugin:mypkg:load?num_classes=3&limit=0", "bad value limit='0'"),
    ]:
        with pytest.raises(DataError, match=None) as err:
            parse_source(bad)
        assert why in str(err.value), (bad, str(err.value))


def test_plugin_source_refuses_settings_that_only_fit_a_dataset() -> None:
    with pytest.raises(DataError, match="partition, augment cannot be used with a plugin"):
        LocalDataConfig("plugin:m:f?num_classes=3", partition="iid", num_clients=2,
                        client_index=0, augment="noise=0.1")
    with pytest.raises(ConfigError, match="class_balanced cannot be used with a plugin"):
        AgentConfig(source="plugin:m:f?num_classes=3", class_balanced=True)
    # the agent's own config takes the source string as it is
    assert AgentConfig(source="plugin:m:f?num_classes=3").data_config().source.startswith(
        "plugin:")


# ---------------------------------------------------------------------- loading


def _module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_load_module_function_and_the_ways_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "plug_ok", """
        class Source:
            @staticmethod
            def load(device_id, round_id, params, spec):
                return None
        def load(device_id, round_id, params, spec):
            return None
        VALUE = 3
    """)
    _module(tmp_path, "plug_broken", "import no_such_dependency_xyz\n")
    assert load_plugin("plug_ok:load").__name__ == "load"
    assert load_plugin("plug_ok:Source.load").__qualname__ == "Source.load"
    for target, message in [
        ("no_such_module_xyz:load",
         "cannot import data plugin 'no_such_module_xyz:load': ModuleNotFoundError: "
         "No module named 'no_such_module_xyz'"),
        ("plug_broken:load",
         "cannot import data plugin 'plug_broken:load': ModuleNotFoundError: "
         "No module named 'no_such_dependency_xyz'"),
        ("plug_ok:missing", "data plugin 'plug_ok:missing': plug_ok has no 'missing'"),
        ("plug_ok:VALUE", "data plugin 'plug_ok:VALUE' is not callable (int)"),
    ]:
        with pytest.raises(DataError) as err:
            load_plugin(target)
        assert str(err.value) == message


def test_entry_point_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packaged plugin as pip installs it: a dist-info with entry_points.txt on sys.path."""
    _module(tmp_path, "packaged_plug", """
        import numpy as np
        def load(device_id, round_id, params, spec):
            n = int(params["n"])
            return np.zeros((n, *spec.shape)), np.arange(n) % spec.num_classes
    """)
    dist = tmp_path / "packaged_plug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: packaged-plug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nzeros = packaged_plug:load\nbroken = packaged_plug:nope\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = PluginSource("zeros", {"n": "3"})
    x, y = source.fetch(DEVICE, 1, SPEC)
    assert x.shape == (3, 64) and y.tolist() == [0, 1, 2]
    with pytest.raises(DataError) as err:
        load_plugin("nosuch")
    assert str(err.value).startswith(
        f"no data plugin 'nosuch' in entry-point group {ENTRY_POINT_GROUP} (installed: ")
    assert "broken, " in str(err.value) and "zeros" in str(err.value)
    with pytest.raises(DataError, match=r"cannot load data plugin 'broken' \(packaged_plug:nope\)"):
        load_plugin("broken")


def test_from_config_imports_the_plugin_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "plug_params", """
        SEEN = []
        def load(device_id, round_id, params, spec):
            SEEN.append((device_id, round_id, dict(params), spec))
            import numpy as np
            return np.ones((4, *spec.shape)), np.array([0, 1, 2, 1])
    """)
    cfg = LocalDataConfig("plugin:plug_params:load?num_classes=10&path=/a.csv&limit=4")
    data = LocalData.from_config(cfg)
    assert isinstance(data, PluginData)
    assert (data.num_classes, len(data), data.name) == (10, 0, "plugin:plug_params:load")
    with pytest.raises(DataError, match="bind"):
        data.round_batch(1)
    with pytest.raises(DataError, match="num_classes=10, the model has 3"):
        data.bind(DEVICE, InputSpec((64,), "float32", 3))
    data.bind(DEVICE, SPEC)
    x, y = data.round_batch(7)
    import plug_params  # type: ignore[import-not-found]

    assert plug_params.SEEN == [(DEVICE, 7, {"path": "/a.csv"}, SPEC)]
    assert len(data) == 4 and sorted(y.tolist()) == [0, 1, 1, 2] and x.dtype == np.float32
    with pytest.raises(DataError, match="cannot import data plugin 'nope_xyz:f'"):
        LocalData.from_config(LocalDataConfig("plugin:nope_xyz:f?num_classes=10"))


# ---------------------------------------------------------------------- the edge core


def plugin_device(
    tmp_path: Path, func: Callable[[str, int, Mapping[str, str], InputSpec], Any]
) -> Device:
    data = PluginData(PluginSource("tests:plug", func=func, limit=100), 10)
    d = Device(tmp_path / "agent", data)
    d.connect()
    d.model(model_msg(load_bundle(BUNDLE).initial_trainable(), 0))
    return d


def _skip_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "skipped" in r.getMessage()]


@pytest.mark.parametrize(("case", "result", "message"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_plugin_data_skips_the_round_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, result: Any, message: str
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    d = plugin_device(tmp_path, lambda *_a: result)
    out = d.round(round_msg(1, 0))
    assert updates(out) == [] and len(d.core.outbox) == 0
    [line] = _skip_lines(caplog)
    assert line.levelno == logging.ERROR and line.exc_info is None
    assert line.getMessage().startswith("round 1 skipped: data plugin tests:plug: ")
    assert message in line.getMessage()
    assert d.counter("data_skips") == 1 and d.counter("train_failures") == 0
    status = decode_status(out[-1].payload)
    assert status.state == "idle" and status.round_id == 1
    reason = line.getMessage().removeprefix("round 1 skipped: ")
    assert status.capabilities["last_skip"] == {"round": 1, "reason": reason}
    assert d.core.store.submitted_update(1) is None


def test_a_plugin_exception_skips_the_round_and_the_next_round_asks_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    calls: list[int] = []

    def flaky(device_id: str, round_id: int, params: Mapping[str, str], spec: InputSpec) -> Any:
        calls.append(round_id)
        if round_id == 1:
            raise OSError("sensor log /var/lib/imu.csv is locked")
        return good(7)

    d = plugin_device(tmp_path, flaky)
    assert updates(d.round(round_msg(1, 0))) == []
    [line] = _skip_lines(caplog)
    assert line.getMessage() == (
        "round 1 skipped: data plugin tests:plug: raised OSError: sensor log "
        "/var/lib/imu.csv is locked")
    assert line.exc_info is None
    assert updates(d.round(round_msg(1, 0))) == []  # the skipped round is not retried
    d.model(model_msg(load_bundle(BUNDLE).initial_trainable(), 1))
    [update] = updates(d.round(round_msg(2, 1)))
    assert update.num_examples == 7 and calls == [1, 2]
    assert decode_status(d.connect()[0].payload).capabilities["examples"] == 7
