"""The device install on 64-bit ARM, checked on an x86_64 machine (issue 13, part 5).

An arm64 Debian bookworm root (what 64-bit Raspberry Pi OS Bookworm is built on: Python 3.11,
glibc 2.36) is built with debootstrap and run through qemu-user + binfmt. The ``edge`` and
``edge-tflite`` extras are installed inside it from aarch64 wheels only (downloaded on the
host with ``pip download --only-binary=:all:``, installed with ``pip --no-index``), so a
dependency without an aarch64 wheel fails here, not on a device. On arm64 Python:

- with ``edge``: the device code encodes and signs an int8 update; the host's aggregator code
  verifies, decodes and folds it, and must get exactly the values the arm64 side decoded;
- with ``edge-tflite``: real training steps of the prebuilt digits-mlp and fmnist-cnn bundles
  through :class:`edge_agent.trainer.LiteRTTrainer` on real data; the held-out loss must fall;
- ai-edge-litert 2.3.0 under qemu-user: see docs/deployment.md, "Supported device platforms".

The root, the wheels and the venvs are cached in ``<repo>/.cache/arm64/`` (git-ignored):
about 2 minutes for debootstrap on the first run, seconds afterwards. Needs root (chroot,
binfmt) and ``qemu-user-static binfmt-support debootstrap`` (``make test`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.signing import verify_update
from fedmq.update.accumulate import WeightedSum
from fedmq.update.codecs import decode_tensors
from fedmq.wire import receive_update
from tests.arm64 import rootfs
from tests.packaging import copy_sources

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "arm64"
PROBE = REPO / "tests" / "arm64" / "device_probe.py"
LITERT_PROBE = REPO / "tests" / "arm64" / "litert_probe.py"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TOOLS = ("debootstrap", "chroot", "update-binfmts", "qemu-aarch64-static")
EXTRAS = {"edge": "fedmq-edge", "edge-tflite": "fedmq-edge-tflite"}
PROBE_DIR = "/opt/probe"  # inside the root
TIMEOUT = 900
#: pytest-timeout covers the module fixtures run inside the first tests: on a fresh machine
#: the first one waits for debootstrap (bound TIMEOUT; 381 s measured cold under load, close
#: to the suite's 600 s default), the second for fedmq's wheel and both offline installs.
TEST_TIMEOUT = 2 * TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]


def _say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print("\n" + line)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arm64_root() -> tuple[Path, dict[str, Any]]:
    """The cached arm64 root with binfmt enabled, and facts about its Python."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the arm64 root needs Linux and root (chroot, binfmt_misc)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: `make test` installs qemu-user-static "
            "binfmt-support debootstrap"
        )
    t0 = time.perf_counter()
    rootfs.enable_binfmt()
    root, reused = rootfs.bookworm_root(CACHE, rootfs.debian_mirror())
    built = time.perf_counter() - t0
    facts = json.loads(
        rootfs.chroot_run(
            root,
            [
                "/usr/bin/python3",
                "-c",
                "import json, platform; print(json.dumps({'machine': platform.machine(), "
                "'python': platform.python_version(), 'libc': platform.libc_ver()}))",
            ],
            timeout=120,
        ).stdout
    )
    facts.update(reused=reused, seconds=round(built, 1))
    return root, facts


@pytest.fixture(scope="module")
def fedmq_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fedmq's own wheel, built on the host with ``pip wheel --no-deps`` from a clean copy of
    the sources (no in-tree ``build/``)."""
    root = tmp_path_factory.mktemp("arm64-wheel")
    src = copy_sources(root / "src")
    out = root / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = out.glob("fedmq-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installs(
    arm64_root: tuple[Path, dict[str, Any]], fedmq_wheel: Path
) -> dict[str, rootfs.Install]:
    """``fedmq[edge]`` and ``fedmq[edge-tflite]`` installed offline inside the root from
    aarch64 wheels downloaded by this checkout's venv (``sys.executable``)."""
    root, facts = arm64_root
    lib, version = facts["libc"]
    assert lib == "glibc", facts
    major, minor = (int(p) for p in version.split(".")[:2])
    platforms = rootfs.aarch64_platforms((major, minor))
    py = ".".join(facts["python"].split(".")[:2])
    out: dict[str, rootfs.Install] = {}
    with rootfs.locked(CACHE / "install.lock"):
        for extra, name in EXTRAS.items():
            dest = CACHE / "wheels" / extra
            wheels = rootfs.download_wheels(
                sys.executable,
                [f"{fedmq_wheel}[{extra}]"],
                dest,
                platforms=platforms,
                python_version=py,
            )
            deps = [w for w in wheels if not w.name.startswith("fedmq-")]
            for w in wheels:
                if w.name.startswith("fedmq-"):
                    w.unlink()  # pip download copies the requirement itself; ours is fresh
            out[extra] = rootfs.install_offline(
                root, name=name, wheels=deps, fedmq_wheel=fedmq_wheel, extra=extra
            )
        probe_dir = root / PROBE_DIR.lstrip("/")
        probe_dir.mkdir(parents=True, exist_ok=True)
        for script in (PROBE, LITERT_PROBE):
            shutil.copy2(script, probe_dir / script.name)
    return out


def _probe(
    root: Path, install: rootfs.Install, args: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    proc = rootfs.chroot_run(
        root,
        [install.python, "-I", f"{PROBE_DIR}/{PROBE.name}", *args],
        timeout=TIMEOUT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, (
        f"arm64 probe {args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["machine"] == "aarch64", report
    assert report["fedmq_file"].startswith(install.venv + "/"), report
    assert report["tensorflow_installed"] is None, report
    return report


def _f32(hex_data: str, shape: list[int]) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_data), dtype="<f4").reshape(shape)


# -- the tests --------------------------------------------------------------------------------
def test_root_is_bookworm_arm64(
    arm64_root: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, facts = arm64_root
    assert facts["machine"] == "aarch64", facts
    assert facts["python"].startswith("3.11."), facts
    assert facts["libc"][0] == "glibc" and facts["libc"][1] == "2.36", facts
    assert (root / "etc/debian_version").read_text().startswith("12."), root
    _say(
        capsys,
        f"arm64 root: Python {facts['python']}, glibc {facts['libc'][1]} "
        f"({'reused' if facts['reused'] else 'built'} in {facts['seconds']:.0f} s)",
    )


def test_edge_install_encodes_what_the_aggregator_decodes(
    arm64_root: tuple[Path, dict[str, Any]],
    installs: dict[str, rootfs.Install],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = arm64_root
    install = installs["edge"]
    check = rootfs.chroot_run(root, [install.python, "-m", "pip", "check"], timeout=TIMEOUT)
    assert "No broken requirements" in check.stdout, check.stdout
    payload_inside = f"{PROBE_DIR}/update.bin"
    payload_host = root / payload_inside.lstrip("/")
    payload_host.unlink(missing_ok=True)
    report = _probe(root, install, ["update", "--out", payload_inside])
    payload = payload_host.read_bytes()
    assert len(payload) == report["payload_bytes"]

    # The aggregator's path on x86_64: decode, authenticate, decode the int8 tensors, fold.
    received = receive_update(payload)
    verify_update(received, report["public_key"])
    msg = received.message
    assert (msg.device, msg.codec, msg.num_examples) == ("pi-1", "int8", report["num_examples"])
    decoded = decode_tensors(msg.tensors, msg.codec)
    expected = {n: _f32(t["decoded"], t["shape"]) for n, t in report["tensors"].items()}
    deltas = {n: _f32(t["delta"], t["shape"]) for n, t in report["tensors"].items()}
    assert list(decoded) == list(expected)
    for name, values in expected.items():
        assert decoded[name].dtype == np.float32
        assert np.array_equal(decoded[name], values), name  # bit for bit
        # int8 with stochastic rounding: within one quantisation step of the true delta.
        step = float(np.abs(deltas[name]).max()) / 127
        assert float(np.abs(values - deltas[name]).max()) <= step * 1.0001, name
    acc = WeightedSum({n: tuple(t["shape"]) for n, t in report["tensors"].items()})
    acc.fold(msg.tensors, msg.codec, float(msg.num_examples))
    result = acc.result()
    assert (result.count, result.total_weight) == (1, float(report["num_examples"]))
    for name, values in expected.items():
        assert np.array_equal(result.mean[name], values), name
    _say(
        capsys,
        f"arm64 edge install ({'reused' if install.reused else 'built'} in "
        f"{install.seconds:.0f} s): numpy {report['numpy_version']}, signed int8 update of "
        f"{len(payload)} bytes decoded bit for bit on {os.uname().machine}",
    )


def _data(model: str) -> dict[str, np.ndarray]:
    """Real examples for ``model``: digits from scikit-learn's copy (host side), Fashion-MNIST
    from Debian's dataset-fashion-mnist test split; disjoint train / held-out slices."""
    if model == "digits-mlp":
        pytest.importorskip("sklearn", reason="digits come from scikit-learn's data")
        from fedmq.data import load_digits

        train, test = load_digits()
        return {
            "x_train": train.x[:480],
            "y_train": train.y[:480],
            "x_eval": test.x[:256],
            "y_eval": test.y[:256],
        }
    from fedmq.data import read_idx

    files = [FASHION_MNIST / f"t10k-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        pytest.fail(f"{FASHION_MNIST} is missing: `make test` installs dataset-fashion-mnist")
    images, labels = (read_idx(f) for f in files)
    x = (images.astype(np.float32) / np.float32(255.0))[..., None]
    y = labels.astype(np.int32)
    return {"x_train": x[:384], "y_train": y[:384], "x_eval": x[-192:], "y_eval": y[-192:]}


# runtime forced with FEDMQ_TFLITE_RUNTIME: (extra installed, numpy major)
RUNTIMES = {
    "tflite-runtime": ("edge-tflite", 1),
    # ai-edge-litert trains through fedmq's own signature call, which never resizes a 0-d
    # input (the crash test below shows the runtime's call crashing on aarch64).
    "ai-edge-litert": ("edge", 2),
}


@pytest.mark.parametrize("model", ["digits-mlp", "fmnist-cnn"])
@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_arm64_install_trains(
    runtime: str,
    model: str,
    arm64_root: tuple[Path, dict[str, Any]],
    installs: dict[str, rootfs.Install],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = arm64_root
    extra, numpy_major = RUNTIMES[runtime]
    install = installs[extra]
    data = root / PROBE_DIR.lstrip("/") / f"{model}.npz"
    np.savez(data, allow_pickle=False, **_data(model))
    args = ["train", "--bundle", model, "--data", f"{PROBE_DIR}/{data.name}", "--epochs", "2"]
    report = _probe(root, install, args, env={"FEDMQ_TFLITE_RUNTIME": runtime})
    assert report["runtime_name"] == runtime, report
    assert int(report["numpy_version"].split(".")[0]) == numpy_major, report
    assert report["weights_finite"], report
    assert report["loss_after"] < 0.9 * report["loss_before"], report
    assert report["epoch_losses"][1] < report["epoch_losses"][0], report
    _say(
        capsys,
        f"arm64 {model} on {runtime} {report['runtime_version']} (numpy "
        f"{report['numpy_version']}, {report['num_threads']} threads): held-out loss "
        f"{report['loss_before']:.3f} -> {report['loss_after']:.3f}, accuracy "
        f"{report['accuracy_before']:.3f} -> {report['accuracy_after']:.3f}",
    )


def test_litert_crash_is_the_scalar_input_resize(
    arm64_root: tuple[Path, dict[str, Any]],
    installs: dict[str, rootfs.Install],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ai-edge-litert on aarch64 dies (SIGSEGV) in ``train``, with or without XNNPACK (the
    reference kernels too), after ``set_weights`` and ``infer`` succeeded; the same calls
    without ``ResizeInputTensor`` on the 0-d ``lr`` input train. If the plain call stops
    crashing (a newer ai-edge-litert), drop the workaround and update docs/deployment.md."""
    root, _ = arm64_root
    install = installs["edge"]
    probe = f"{PROBE_DIR}/{LITERT_PROBE.name}"
    outcomes: dict[str, tuple[int, str]] = {}
    for label, flags in (
        ("xnnpack", ["--resolver", "AUTO"]),
        ("reference kernels", ["--resolver", "BUILTIN_REF"]),
        ("xnnpack, no 0-d resize", ["--resolver", "AUTO", "--no-scalar-resize"]),
    ):
        proc = rootfs.chroot_run(
            root, [install.python, "-I", probe, "digits-mlp", *flags], timeout=TIMEOUT, check=False
        )
        outcomes[label] = (proc.returncode, proc.stdout)
    for label in ("xnnpack", "reference kernels"):
        code, out = outcomes[label]
        assert code in (-11, 128 + 11), (label, code, out)  # SIGSEGV, no Python traceback
        assert "ok infer" in out and "ok train" not in out, (label, out)
    code, out = outcomes["xnnpack, no 0-d resize"]
    assert code == 0 and "ok train {'loss': 2.30258" in out, (code, out)
    _say(capsys, "arm64 ai-edge-litert: train crashes on the 0-d input resize; runs without it")
