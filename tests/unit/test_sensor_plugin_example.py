"""The worked example plugin (examples/sensor_plugin) on real CSV files."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedmq.data.datasets import load_csv_windows
from fedmq.data.plugin import ENTRY_POINT_GROUP, InputSpec, PluginDataError, PluginSource

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sensor_plugin"
FLAT = InputSpec((64,), "float32", 10)  # digits-mlp
SEQ = InputSpec((16, 4), "float32", 10)  # a model taking the windows as sequences


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import sensor_plugin  # type: ignore[import-not-found]

    yield sensor_plugin
    sys.modules.pop("sensor_plugin", None)


def write_log(path: Path, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=(rows, 4)), 4)
    labels = np.arange(rows) % 10
    lines = ["ax,ay,az,temp,label"] + [
        ",".join(f"{v:.4f}" for v in row) + f",{label}"
        for row, label in zip(values, labels, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return values


def test_windows_of_the_file_as_it_is_now_shaped_for_the_model(
    plugin: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "imu.csv"
    values = write_log(path, 40)
    params = {"path": str(path), "window": "16", "stride": "8"}
    x, y = plugin.load_round("pi-0", 1, params, FLAT)
    assert x.shape == (4, 64) and y.tolist() == [5, 3, 1, 9]  # labels of rows 15, 23, 31, 39
    np.testing.assert_allclose(x[1].reshape(16, 4), values[8:24], rtol=1e-6)
    seq, _ = plugin.load_round("pi-0", 1, params, SEQ)
    assert seq.shape == (4, 16, 4)
    # the same windows as fedmq's reader gives
    ref = load_csv_windows(path, window=16, stride=8, label_column="label")
    np.testing.assert_array_equal(seq, ref.x)
    # the file grows: the next round sees more windows; newest keeps the latest ones
    write_log(path, 64)
    assert len(plugin.load_round("pi-0", 2, params, FLAT).x) == 7
    newest = plugin.load_round("pi-0", 2, {**params, "newest": "2"}, FLAT)
    assert newest.y.tolist() == [5, 3]  # rows 55 and 63


def test_its_failures_become_one_line_round_skips(plugin: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "imu.csv"
    write_log(path, 40)
    cases = [
        ({"window": "16"}, "raised ValueError: option path=FILE is required"),
        ({"path": str(path)}, "raised ValueError: option window=N is required"),
        ({"path": str(path), "window": "10"},
         "raised ValueError: windows of (10, 4) do not fit the model's input (64,)"),
        ({"path": str(tmp_path / "gone.csv"), "window": "16"},
         f"raised DataError: {tmp_path / 'gone.csv'}: no such file"),
    ]
    for params, message in cases:
        source = PluginSource("sensor_plugin:load_round", params)
        with pytest.raises(PluginDataError) as err:
            source.fetch("pi-0", 1, FLAT)
        assert str(err.value) == f"data plugin sensor_plugin:load_round: {message}"
    # a half-written last line (the writer is mid-append): that round fails, not the agent
    with path.open("a") as fh:
        fh.write("0.1,0.2")
    with pytest.raises(PluginDataError, match=r"imu.csv:42: 2 fields, header has 5"):
        PluginSource("sensor_plugin:load_round", {"path": str(path), "window": "16"}).fetch(
            "pi-0", 1, FLAT)


def test_the_package_registers_its_entry_point() -> None:
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"][ENTRY_POINT_GROUP] == {
        "sensors": "sensor_plugin:load_round"
    }
