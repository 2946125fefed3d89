"""The pure parts of tests/arm64/rootfs.py: the Debian mirror from apt sources, pip tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.arm64.rootfs import BuildError, aarch64_platforms, debian_mirror


def _etc(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_mirror_from_deb822_skips_security_disabled_and_other_suites(tmp_path: Path) -> None:
    etc = _etc(
        tmp_path,
        {
            "sources.list": "# nothing here\n",
            "sources.list.d/a-node.sources": (
                "Types: deb\nURIs: https://node.example/\nSuites: nodistro\nComponents: main\n"
            ),
            "sources.list.d/debian.sources": (
                "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
                "Enabled: no\n\n"
                "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n\n"
                "Types: deb\nURIs: http://mirror.example/debian-security\n"
                "Suites: bookworm-security\nComponents: main\n"
            ),
        },
    )
    assert debian_mirror(etc) == "http://mirror.example/debian"


def test_mirror_from_one_line_format_with_options(tmp_path: Path) -> None:
    etc = _etc(
        tmp_path,
        {
            "sources.list": (
                "deb-src http://src.example/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
            )
        },
    )
    assert debian_mirror(etc) == "http://one.example/debian"


def test_no_bookworm_source_is_one_clear_error(tmp_path: Path) -> None:
    etc = _etc(tmp_path, {"sources.list": "deb http://x.example/ubuntu jammy main\n"})
    with pytest.raises(BuildError, match=r"no 'deb' source for suite bookworm in .*sources\.list"):
        debian_mirror(etc)


def test_aarch64_platform_tags_for_bookworm_glibc() -> None:
    tags = aarch64_platforms((2, 36))
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-2:] == [
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
    ]
    assert len(tags) == 21
    with pytest.raises(BuildError):
        aarch64_platforms((2, 12))
