"""An arm64 Debian root on an x86_64 machine, for testing the device install (issue 13).

- :func:`debian_mirror` reads the Debian mirror from this machine's apt sources (nothing is
  hard-coded: CI machines point at their own mirror).
- :func:`enable_binfmt` makes the kernel run aarch64 ELF files with ``qemu-aarch64-static``
  (Debian's binfmt entry has the ``F`` flag, so the chroot needs no copy of qemu).
- :func:`bookworm_root` builds ``debootstrap --arch=arm64 --variant=minbase`` with Python 3.11
  once and caches it (a marker file records the finished build and what it was built from).
- :func:`download_wheels` fetches aarch64 wheels on the host (``pip download
  --only-binary=:all:``), :func:`install_offline` installs them in a venv inside the root
  with ``--no-index``: a dependency without an aarch64 wheel fails there.
- :func:`chroot_run` runs a command inside the root with a clean environment.

All of it needs root (chroot, mount). Figures in docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BOOKWORM_PACKAGES",
    "BuildError",
    "Install",
    "aarch64_platforms",
    "bookworm_root",
    "chroot_run",
    "debian_mirror",
    "download_wheels",
    "enable_binfmt",
    "install_offline",
    "locked",
]

SUITE = "bookworm"
BOOKWORM_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
_MARKER = ".fedmq-root"
_CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildError(RuntimeError):
    """A step of building or using the arm64 root failed (the message has its output)."""


def _run(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise BuildError(
            f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise concurrent test sessions sharing the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the mirror -------------------------------------------------------------------------------
def _source_files(etc: Path) -> list[Path]:
    files = [etc / "sources.list"]
    d = etc / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return [f for f in files if f.is_file()]


def _entries(text: str, deb822: bool) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each entry of one sources file."""
    if not deb822:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3:
                yield [words[0]], [words[1]], [words[2]]
        return
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if fields.get("enabled", ["yes"])[0].lower() == "no":
            continue
        yield fields.get("types", []), fields.get("uris", []), fields.get("suites", [])


def debian_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The first ``deb`` URI serving the ``bookworm`` suite in the apt sources under ``etc``.

    Raises :class:`BuildError` naming the files read when there is none."""
    files = _source_files(etc)
    for f in files:
        for types, uris, suites in _entries(f.read_text(), f.suffix == ".sources"):
            if "deb" in types and SUITE in suites and uris:
                return uris[0]
    raise BuildError(
        f"no 'deb' source for suite {SUITE} in {', '.join(map(str, files)) or etc}: "
        "cannot pick a Debian mirror for debootstrap"
    )


# -- binfmt -----------------------------------------------------------------------------------
def enable_binfmt() -> None:
    """Make aarch64 binaries run through qemu-user (idempotent; needs root)."""
    entry = BINFMT_DIR / "qemu-aarch64"
    if not (BINFMT_DIR / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], timeout=30)
    if not entry.is_file() or not entry.read_text().startswith("enabled"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], timeout=60)
    text = entry.read_text() if entry.is_file() else ""
    if not text.startswith("enabled"):
        raise BuildError(f"binfmt entry {entry} is not enabled after update-binfmts: {text!r}")
    if "flags: " not in text or "F" not in text.split("flags: ", 1)[1].split()[0]:
        raise BuildError(f"binfmt entry {entry} lacks the F flag (qemu outside the chroot)")


# -- the root ---------------------------------------------------------------------------------
def bookworm_root(cache: Path, mirror: str, *, timeout: float = 900) -> tuple[Path, bool]:
    """An arm64 bookworm minbase root with Python 3 in ``cache/root``; (path, reused).

    Rebuilt when the marker (written only after a finished build) is missing or records a
    different package list; the mirror does not change the root, so it is not part of it."""
    root = cache / "root"
    key = json.dumps({"suite": SUITE, "arch": "arm64", "include": list(BOOKWORM_PACKAGES)})
    marker = root / _MARKER
    with locked(cache / "root.lock"):
        if marker.is_file() and marker.read_text() == key:
            return root, True
        tmp = cache / "root.tmp"
        for d in (tmp, root):
            if d.exists():
                shutil.rmtree(d)
        _run(
            [
                "debootstrap",
                "--arch=arm64",
                "--variant=minbase",
                "--include=" + ",".join(BOOKWORM_PACKAGES),
                SUITE,
                str(tmp),
                mirror,
            ],
            timeout=timeout,
        )
        tmp.rename(root)
        marker.write_text(key)
        return root, False


def chroot_run(
    root: Path,
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``chroot root argv`` with only HOME, PATH, LANG and ``env`` set."""
    clean = {"HOME": "/root", "PATH": _CLEAN_PATH, "LANG": "C.UTF-8"}
    clean.update(env or {})
    return _run(["chroot", str(root), *argv], timeout=timeout, env=clean, check=check)


# -- wheels -----------------------------------------------------------------------------------
def aarch64_platforms(glibc: tuple[int, int]) -> list[str]:
    """pip ``--platform`` tags a Linux aarch64 system with this glibc accepts, newest first."""
    major, minor = glibc
    if major != 2 or minor < 17:
        raise BuildError(f"unexpected glibc {major}.{minor} in the arm64 root")
    return [f"manylinux_2_{m}_aarch64" for m in range(minor, 16, -1)] + ["manylinux2014_aarch64"]


def download_wheels(
    python: str,
    requirements: Sequence[str],
    dest: Path,
    *,
    platforms: Sequence[str],
    python_version: str,
    timeout: float = 900,
) -> list[Path]:
    """``pip download --only-binary=:all:`` of ``requirements`` for the target into ``dest``
    (files already there are kept: pip skips them). Returns the wheels in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [python, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "--implementation", "cp", "--abi", abi]
    cmd += ["--python-version", python_version, "-d", str(dest)]
    for tag in platforms:
        cmd += ["--platform", tag]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    _run([*cmd, *requirements], timeout=timeout, env=env)
    return sorted(dest.glob("*.whl"))


@dataclass(frozen=True)
class Install:
    """A venv inside the root: ``python`` is its interpreter as seen inside the chroot."""

    venv: str
    python: str
    reused: bool
    seconds: float


def install_offline(
    root: Path,
    *,
    name: str,
    wheels: Sequence[Path],
    fedmq_wheel: Path,
    extra: str,
    timeout: float = 900,
) -> Install:
    """Install ``fedmq[extra]`` from ``wheels`` only (``pip --no-index``) into ``/opt/NAME``
    inside ``root``. The venv is reused when the dependency wheels are the same as last
    time; then only fedmq's wheel is reinstalled."""
    venv = f"/opt/{name}"
    python = f"{venv}/bin/python"
    inside = Path(f"/opt/wheels/{name}")
    host_dir = root / inside.relative_to("/")
    key = hashlib.sha256(
        json.dumps([extra, sorted(w.name for w in wheels), platform.machine()]).encode()
    ).hexdigest()
    marker = root / venv.lstrip("/") / ".fedmq-deps"
    t0 = time.perf_counter()
    if host_dir.exists():
        shutil.rmtree(host_dir)
    host_dir.mkdir(parents=True)
    for w in [*wheels, fedmq_wheel]:
        shutil.copy2(w, host_dir / w.name)
    target = f"{inside}/{fedmq_wheel.name}"
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    no_compile = ["--no-compile"]  # bytecode is compiled on first import, not under pip
    reused = marker.is_file() and marker.read_text() == key
    if reused:
        chroot_run(
            root,
            [*pip, "install", *no_compile, "--no-index", "--no-deps", "--force-reinstall", target],
            timeout=timeout,
        )
    else:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        chroot_run(root, ["/usr/bin/python3", "-m", "venv", "--clear", venv], timeout=timeout)
        chroot_run(
            root,
            [
                *pip,
                "install",
                *no_compile,
                "--no-index",
                "--find-links",
                str(inside),
                f"{target}[{extra}]",
            ],
            timeout=timeout,
        )
        marker.write_text(key)
    return Install(venv, python, reused, round(time.perf_counter() - t0, 1))
