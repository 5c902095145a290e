"""Unpacking the govuk-frontend tarball: only its compiled files, only inside the target, on
every Python 3.11 (Debian 12's 3.11.2 has no ``extractall(filter=...)``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from referral_broker.consumers.inbox.frontend import _unpack
from referral_broker.errors import ConfigError


def _tarball(path: Path, entries: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A gzipped tar of (name, file bytes, or None with a symlink target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                assert data is not None
                info.size, info.mode = len(data), 0o4755  # a setuid bit the copy must not keep
                tar.addfile(info, io.BytesIO(data))
    return path


def test_the_compiled_files_are_copied_and_nothing_else(tmp_path: Path) -> None:
    tarball = _tarball(
        tmp_path / "t.tgz",
        [
            ("package/dist/govuk/govuk-frontend.min.css", b"css", None),
            ("package/dist/govuk/assets/fonts/a.woff2", b"font", None),
            ("package/dist/govuk/assets/manifest.json", b"{}", None),
            ("package/dist/govuk/other.js", b"not kept", None),
            ("package/package.json", b"not kept", None),
            ("package/dist/govuk/assets/images/link.png", None, "/etc/passwd"),
        ],
    )
    target = tmp_path / "out"
    target.mkdir()
    _unpack(tarball, target)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() or p.is_symlink())
    assert found == ["fonts/a.woff2", "govuk-frontend.min.css", "manifest.json"]
    assert (target / "fonts" / "a.woff2").read_bytes() == b"font"
    assert not (target / "govuk-frontend.min.css").stat().st_mode & 0o7000  # no setuid kept


def test_a_name_that_climbs_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path / "t.tgz", [("package/dist/govuk/assets/../../../../escaped.txt", b"x", None)])
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ConfigError, match="outside its folder"):
        _unpack(tarball, target)
    assert not list(tmp_path.rglob("escaped.txt"))
