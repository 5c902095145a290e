"""The folders this package makes are private to its user, the ones above the one it asked for
included: on a fresh machine the first command made the data folder 0755 (``mkdir``'s mode
reaches the last folder only) and the inbox then warned about a folder the demo had made."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.folders import private_folder
from referral_broker.sealing import KeyStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_every_folder_it_makes_is_0700_and_an_existing_one_is_left(tmp_path: Path, usual_umask: None) -> None:
    existing = tmp_path / "home"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    target = existing / "share" / "referral-broker" / "router"

    assert private_folder(target) == target

    assert [mode(p) for p in (target, target.parent, target.parent.parent)] == [0o700] * 3
    assert mode(existing) == 0o755  # not made here: the user's choice stands
    assert private_folder(target) == target  # again: nothing to do


def test_a_file_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        private_folder(tmp_path / "data")
    with pytest.raises(OSError):
        private_folder(tmp_path / "data" / "keys")


def test_a_fresh_data_folder_is_private_and_the_inbox_does_not_warn_about_it(
    tmp_path: Path, usual_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo's order on a fresh machine: key stores first, then the inbox's database."""
    data = tmp_path / "share" / "referral-broker"
    KeyStore.create(data / "keys", "district-cambridge")
    with caplog.at_level(logging.WARNING), InboxStore(data / "inbox.sqlite3"):
        pass
    assert mode(data) == 0o700 and mode(data.parent) == 0o700
    assert not [r for r in caplog.records if "open to others" in r.getMessage()]
