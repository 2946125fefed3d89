"""``fedmq keygen`` and ``fedmq enroll`` through the real command: every bad file is one
error line naming the path and what is wrong, exit code 1, never a traceback; keys are
never replaced silently."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fedmq.signing import DeviceKey, Registry, load_or_create_key
from tests.fakes import fedmq_cli

KEY_A = DeviceKey.from_seed(bytes(range(32))).public_hex
KEY_B = DeviceKey.from_seed(bytes(range(1, 33))).public_hex


def _fails_with_one_line(args: tuple[str, ...], *expected: str) -> str:
    done = fedmq_cli("-q", *args)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, done.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "is malformed: not JSON"),
        (json.dumps({"devices": []}), "found list"),
        (json.dumps([1, 2]), "found list"),
        (json.dumps({"devices": {"dev-1": "abcd"}}), "device 'dev-1' has no \"public_key\""),
    ],
)
@pytest.mark.parametrize("action", ["enroll", "revoke", "list"])
def test_enroll_on_a_bad_registry_is_one_line(
    tmp_path: Path, content: str, why: str, action: str
) -> None:
    reg = tmp_path / "devices.json"
    reg.write_text(content)
    args = {
        "enroll": ("enroll", "dev-2", KEY_A, "--registry", str(reg)),
        "revoke": ("enroll", "--revoke", "dev-1", "--registry", str(reg)),
        "list": ("enroll", "--list", "--registry", str(reg)),
    }[action]
    _fails_with_one_line(args, f"registry {reg}", why)
    assert reg.read_text() == content  # left as it was


def test_enroll_on_a_directory_is_one_line(tmp_path: Path) -> None:
    _fails_with_one_line(("enroll", "dev-1", KEY_A, "--registry", str(tmp_path)),
                         f"registry {tmp_path} is not a file")


def test_aggregator_registry_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    regdir = tmp_path / "registry"
    regdir.mkdir()
    _fails_with_one_line(
        ("aggregator", "--registry", str(regdir), "--state-dir", str(tmp_path / "state"),
         "--port", "1"),
        f"registry {regdir} is not a file",
    )


def test_keygen_on_a_directory_is_one_line(tmp_path: Path) -> None:
    _fails_with_one_line(("keygen", "--key", str(tmp_path)),
                         f"key file {tmp_path} is not a regular file")


def test_keygen_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    load_or_create_key(path)
    before = path.read_bytes()
    os.chmod(path, 0o644)
    _fails_with_one_line(("keygen", "--key", str(path)),
                         f"key file {path} is readable by others (mode 0644)")
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_keygen_keeps_a_key_and_replaces_it_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    first = fedmq_cli("-q", "keygen", "--key", str(path))
    assert first.returncode == 0 and first.stderr == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = fedmq_cli("-q", "keygen", "--key", str(path))
    assert again.stdout == first.stdout  # same public key, file untouched
    os.chmod(path, 0o644)  # --force also replaces a key that may have leaked
    forced = fedmq_cli("-q", "keygen", "--key", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    new_pub = forced.stdout.strip()
    assert new_pub != first.stdout.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path).public_hex == new_pub
    old_fp = Registry.fingerprint(first.stdout.strip())
    assert f"replaced the key in {path} (was {old_fp}, now {Registry.fingerprint(new_pub)})" \
        in forced.stderr


def test_keygen_under_umask_000_still_writes_0600(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    old = os.umask(0)
    try:
        done = fedmq_cli("-q", "keygen", "--key", str(path))
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_enroll_refuses_to_replace_a_key_without_replace(tmp_path: Path) -> None:
    reg = tmp_path / "devices.json"
    assert fedmq_cli("-q", "enroll", "dev-1", KEY_A, "--registry", str(reg)).returncode == 0
    before = reg.read_text()
    _fails_with_one_line(
        ("enroll", "dev-1", KEY_B, "--registry", str(reg)),
        f"device dev-1 is already enrolled in {reg} with key {Registry.fingerprint(KEY_A)}",
        f"refusing to replace it with {Registry.fingerprint(KEY_B)}", "--replace",
    )
    assert reg.read_text() == before
    same = fedmq_cli("-q", "enroll", "dev-1", KEY_A, "--registry", str(reg))
    assert same.returncode == 0 and "already enrolled with this key" in same.stdout
    assert reg.read_text() == before
    done = fedmq_cli("enroll", "dev-1", KEY_B, "--registry", str(reg), "--replace")
    assert done.returncode == 0, done.stderr
    assert (f"device dev-1: replacing key {Registry.fingerprint(KEY_A)} with "
            f"{Registry.fingerprint(KEY_B)}") in done.stderr
    assert Registry(reg).public_key("dev-1") == KEY_B
