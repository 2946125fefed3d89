"""fedmq on a device: a virtual environment with ONLY the edge dependencies (no TensorFlow).

Two variants, each its own venv built with pip (everything comes from the package index):

- ``ai-edge-litert``: ``pip install fedmq[edge]`` (numpy 2);
- ``tflite-runtime``: ``pip install fedmq[edge-tflite]`` (tflite-runtime 2.14.0 + numpy<2, the
  Raspberry Pi OS Bookworm combination).

In each: TensorFlow must not be importable, ``python -m edge_agent --help`` must work, and
``tests/edge_env_probe.py`` trains the fmnist-cnn and fmnist-lstm bundles (exported with the
main venv's TensorFlow 2.21, or the prebuilt ones shipped in the wheel) on real Fashion-MNIST:
the runtime must be the expected one, the held-out loss must fall and the accuracy rise. The
venv size, peak RSS and examples/s are printed and written to ``bench/results/edge_env.json``
(figures only, no timed assertions).

fedmq is installed from a wheel built from a clean copy of the sources (what ``pip install
<repo>`` builds, without its in-tree ``build/`` directory). The venvs are cached in
``<repo>/.venv-edge-cache/`` (git-ignored), keyed by Python version and the requirement
lists in pyproject.toml; a cached venv gets the freshly built fedmq reinstalled. Set
``FEDMQ_EDGE_VENV_CACHE=0`` to build them in a temporary directory instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.packaging import copy_sources

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "edge_env_probe.py"
RESULTS = REPO / "bench" / "results" / "edge_env.json"
CACHE_DIR = REPO / ".venv-edge-cache"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MODELS = ("fmnist-cnn", "fmnist-lstm")
PIP_TIMEOUT = 900


@dataclass(frozen=True)
class Variant:
    runtime: str  # expected fedmq.models.litert.runtime_name()
    extra: str  # the pyproject extra installed with fedmq
    cache_name: str
    numpy_major: int
    supported: bool
    why_unsupported: str


_MACHINE = platform.machine()
VARIANTS = {
    "ai-edge-litert": Variant(
        runtime="ai-edge-litert",
        extra="edge",
        cache_name="litert",
        numpy_major=2,
        supported=(sys.platform, _MACHINE)
        in {("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"), ("win32", "AMD64")},
        why_unsupported=f"ai-edge-litert has no wheels for {sys.platform}/{_MACHINE}",
    ),
    "tflite-runtime": Variant(
        runtime="tflite-runtime",
        extra="edge-tflite",
        cache_name="tflite",
        numpy_major=1,
        supported=sys.platform == "linux"
        and _MACHINE in ("x86_64", "aarch64", "armv7l")
        and sys.version_info < (3, 12),
        why_unsupported=(
            f"tflite-runtime 2.14.0 has no wheels for Python {platform.python_version()} "
            f"on {sys.platform}/{_MACHINE}"
        ),
    ),
}


# -- helpers ----------------------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "FEDMQ_")) and k != "VIRTUAL_ENV"
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(
    cmd: list[str], *, cwd: Path, timeout: float = PIP_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _du_mb(path: Path) -> float:
    du = shutil.which("du")
    if du:
        out = subprocess.run([du, "-sk", str(path)], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return int(out.stdout.split()[0]) / 1024.0
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / (1024.0 * 1024.0)


def _requirements(extra: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent test sessions building the same cached venv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_results(key: str, entry: dict[str, Any]) -> None:
    """Merge one variant's figures into bench/results/edge_env.json (atomic replace)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / "results.lock"):
        try:
            data = json.loads(RESULTS.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data.setdefault("variants", {})[key] = entry
        data["machine"] = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(RESULTS)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fedmq_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the working tree, built with pip from a clean copy of the sources."""
    root = tmp_path_factory.mktemp("fedmq-wheel")
    src = copy_sources(root / "src")
    out = root / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        cwd=root,
    )
    wheels = sorted(out.glob("fedmq-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``--bundle`` argument of the probe per model: ``prebuilt:NAME`` when the repo ships
    that bundle (then it comes from the wheel installed in the edge venv), else a bundle
    exported here with the main venv's TensorFlow."""
    from fedmq.errors import ModelError
    from fedmq.models.spec import load_bundle, prebuilt_bundle_path

    out: dict[str, str] = {}
    for name in MODELS:
        try:
            load_bundle(prebuilt_bundle_path(name))
            out[name] = f"prebuilt:{name}"
            continue
        except ModelError:
            pass
        pytest.importorskip("tensorflow", reason="no prebuilt bundle and no TensorFlow to export")
        from fedmq.models.export import export_model

        bundle = export_model(name, tmp_path_factory.mktemp("bundles") / name)
        out[name] = str(bundle.path)
    return out


def _edge_venv(variant: Variant, wheel: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Create (or reuse) the variant's venv; returns it and facts about how it was made."""
    reqs = _requirements(variant.extra)
    key = hashlib.sha256(
        json.dumps([sys.version, sys.platform, _MACHINE, variant.extra, reqs]).encode()
    ).hexdigest()
    use_cache = os.environ.get("FEDMQ_EDGE_VENV_CACHE", "1") != "0"
    venv = CACHE_DIR / variant.cache_name if use_cache else tmp_path / f"venv-{variant.cache_name}"
    marker = venv / ".fedmq-edge-key"
    info: dict[str, Any] = {"requirements": reqs, "cached_dir": use_cache}
    python = _venv_python(venv)
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.perf_counter()
    reused = use_cache and marker.is_file() and marker.read_text() == key and python.exists()
    if reused:
        # Same requirements: only fedmq itself is refreshed from this run's wheel.
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--force-reinstall",
                str(wheel),
            ],
            cwd=tmp_path,
        )
    else:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        _run([base, "-m", "venv", "--clear", str(venv)], cwd=tmp_path)
        _run(
            [str(python), "-m", "pip", "install", "-q", f"{wheel}[{variant.extra}]"],
            cwd=tmp_path,
        )
        if use_cache:
            marker.write_text(key)
    info["reused"] = reused
    info["install_seconds"] = round(time.perf_counter() - t0, 1)
    return venv, info


# -- the test ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_edge_only_env(
    variant_name: str,
    fedmq_wheel: Path,
    bundles: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    variant = VARIANTS[variant_name]
    if not variant.supported:
        pytest.skip(variant.why_unsupported)
    started = time.perf_counter()
    with _locked(CACHE_DIR / f"{variant.cache_name}.lock"):
        venv, info = _edge_venv(variant, fedmq_wheel, tmp_path)
        python = str(_venv_python(venv))

        # Only the edge dependencies: pip agrees they are consistent, TensorFlow is absent.
        _run([python, "-m", "pip", "check"], cwd=tmp_path)
        freeze = _run([python, "-m", "pip", "freeze", "--all"], cwd=tmp_path).stdout
        installed = {
            line.split("==")[0].split(" @ ")[0].strip().lower().replace("_", "-")
            for line in freeze.splitlines()
            if line.strip()
        }
        tf_like = sorted(d for d in installed if d.startswith(("tensorflow", "tf-", "keras")))
        assert not tf_like, f"TensorFlow/Keras installed in the edge venv: {tf_like}"
        # dp-accounting (pins attrs<24) belongs to the aggregator extra only (docs/privacy.md)
        assert "dp-accounting" not in installed, sorted(installed)
        assert variant.runtime in installed, sorted(installed)
        proc = _run([python, "-I", "-c", "import tensorflow"], cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, proc.stderr

        # The agent's command line works without TensorFlow.
        helped = _run([python, "-I", "-m", "edge_agent", "--help"], cwd=tmp_path, timeout=120)
        assert "usage" in helped.stdout.lower(), helped.stdout
        venv_mb = _du_mb(venv)

        # Train each model for real in the edge venv.
        if not FASHION_MNIST.is_dir():
            pytest.skip(f"{FASHION_MNIST} is missing (apt-get install dataset-fashion-mnist)")
        runs: dict[str, dict[str, Any]] = {}
        for model in MODELS:
            proc = _run(
                [
                    python,
                    "-I",
                    str(PROBE),
                    "--bundle",
                    bundles[model],
                    "--data-root",
                    str(FASHION_MNIST),
                    "--train",
                    "2000",
                    "--eval",
                    "1000",
                ],
                cwd=tmp_path,
                timeout=300,
                check=False,
            )
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 3 and lines and "skip" in json.loads(lines[-1]):
                pytest.skip(json.loads(lines[-1])["skip"])
            assert proc.returncode == 0 and lines, (
                f"probe failed ({proc.returncode}) on {model}\n{proc.stdout[-4000:]}"
                f"\n{proc.stderr[-6000:]}"
            )
            runs[model] = json.loads(lines[-1])

    for model, r in runs.items():
        where = f"{variant_name}/{model}"
        assert Path(r["fedmq_file"]).is_relative_to(venv.resolve()), (where, r["fedmq_file"])
        assert not r["tensorflow_importable"] and not r["tensorflow_loaded"], where
        assert r["runtime_name"] == variant.runtime == r["trainer_runtime"], (where, r)
        assert int(r["numpy_version"].split(".")[0]) == variant.numpy_major, (where, r)
        assert r["weights_finite"] and r["weights_changed"], (where, r)
        assert r["loss_after"] < 0.95 * r["loss_before"], (where, r)
        assert r["accuracy_after"] >= r["accuracy_before"] + 0.1, (where, r)

    seconds = round(time.perf_counter() - started, 1)
    keep = (
        "runtime_version",
        "numpy_version",
        "bundle",
        "exported_with",
        "num_threads",
        "examples_train",
        "loss_before",
        "loss_after",
        "accuracy_before",
        "accuracy_after",
        "examples_per_second",
        "train_seconds",
        "peak_rss_before_model_mb",
        "peak_rss_mb",
    )
    entry = {
        "runtime": variant.runtime,
        "extra": variant.extra,
        "venv_mb": round(venv_mb, 1),
        "venv_reused": info["reused"],
        "install_seconds": info["install_seconds"],
        "test_seconds": seconds,
        "models": {m: {k: r.get(k) for k in keep} for m, r in runs.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_results(variant_name, entry)
    record_property("edge_env", json.dumps(entry))
    first = next(iter(runs.values()))
    summary = [
        f"edge venv [{variant.extra}] {variant.runtime} {first['runtime_version']}, "
        f"numpy {first['numpy_version']}: {venv_mb:.0f} MB on disk "
        f"({'reused' if info['reused'] else 'built'} in {info['install_seconds']:.0f} s)"
    ]
    for model, r in runs.items():
        summary.append(
            f"  {model}: {r['examples_per_second']:.0f} examples/s, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, held-out loss {r['loss_before']:.3f} -> "
            f"{r['loss_after']:.3f}, accuracy {r['accuracy_before']:.3f} -> "
            f"{r['accuracy_after']:.3f}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(summary))
