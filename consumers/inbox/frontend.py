"""The GOV.UK Frontend assets (compiled CSS, JS, fonts, images), installed outside git.

``govuk-frontend`` comes from npm at the exact version the installed ``govuk-frontend-jinja``
macros are ported from, so the markup the macros write and the CSS that styles it agree. The
tarball is fetched with ``npm pack`` (npm's own client and registry settings), checked against
the pinned SHA-512 integrity, and only ``dist/govuk``'s compiled files are unpacked into the
user's cache folder::

    <cache>/govuk-frontend/<version>/govuk-frontend.min.css, govuk-frontend.min.js,
                                     fonts/, images/, manifest.json

The app serves that folder at ``/assets``, which is where the compiled CSS looks for its fonts
and images. Installing is idempotent: a complete install is recognised by its marker file and
left alone; a partial one is replaced atomically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from referral_broker.config import Settings
from referral_broker.errors import ConfigError

GOVUK_FRONTEND_VERSION = "6.3.0"  # govuk-frontend-jinja 4.1.0 ports the 6.3.0 macros
GOVUK_FRONTEND_INTEGRITY = (
    "sha512-cXIQxm5PHCsbic47GXZrVBZhAeeshTLRL6ZBKilLsR6rMCjJuWb7Fruq0VUNMBJFlJk/srsRj/q8d5bM9cgKoA=="
)
_DIST = "package/dist/govuk/"
_KEEP_FILES = ("govuk-frontend.min.css", "govuk-frontend.min.js")
_KEEP_TREE = "assets/"
_MARKER = ".installed"
REQUIRED = ("govuk-frontend.min.css", "govuk-frontend.min.js", "fonts", "images", "manifest.json")


def frontend_dir(settings: Settings) -> Path:
    return settings.paths_cache_dir / "govuk-frontend" / GOVUK_FRONTEND_VERSION


def is_installed(settings: Settings) -> bool:
    folder = frontend_dir(settings)
    return (folder / _MARKER).is_file() and all((folder / name).exists() for name in REQUIRED)


def _integrity(tarball: Path) -> str:
    digest = hashlib.sha512(tarball.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode("ascii")


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(
            "npm is needed once to fetch govuk-frontend: install it (Debian: apt-get install npm), "
            "then run 'referral-broker inbox setup'"
        )
    try:
        proc = subprocess.run(
            [npm, "pack", f"govuk-frontend@{GOVUK_FRONTEND_VERSION}", "--json", "--silent"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"npm pack govuk-frontend@{GOVUK_FRONTEND_VERSION} failed: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"npm pack govuk-frontend@{GOVUK_FRONTEND_VERSION} failed (exit {proc.returncode}): {last}"
        )
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        found = sorted(workdir.glob("govuk-frontend-*.tgz"))
        if not found:
            raise ConfigError("npm pack did not produce the govuk-frontend tarball") from None
        return found[0]
    return workdir / filename


def _unpack(tarball: Path, target: Path) -> None:
    """Copy the kept regular files of ``dist/govuk`` into ``target``, byte for byte.

    Written out here, not with ``extractall(filter="data")``: that argument is missing from the
    Python 3.11 that Debian 12 ships (3.11.2; it came in 3.11.4). Only regular files are read,
    under names checked to stay inside ``target``: no links, devices, modes or owners."""
    root = target.resolve()
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(_DIST) or not member.isfile():
                continue
            inner = member.name[len(_DIST) :]
            if inner in _KEEP_FILES:
                name = inner
            elif inner.startswith(_KEEP_TREE):
                name = inner[len(_KEEP_TREE) :]
            else:
                continue
            dest = (root / name).resolve()
            if not name or not dest.is_relative_to(root) or dest == root:
                raise ConfigError(f"govuk-frontend tarball holds a file outside its folder: {member.name[:200]!r}")
            source = tar.extractfile(member)
            if source is None:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with source, open(dest, "wb") as out:
                shutil.copyfileobj(source, out)


def install_frontend(settings: Settings, *, force: bool = False) -> Path:
    """Make the pinned govuk-frontend assets available; return their folder. Idempotent."""
    folder = frontend_dir(settings)
    if is_installed(settings) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        work = Path(tmp)
        tarball = _npm_pack(work)
        got = _integrity(tarball)
        if got != GOVUK_FRONTEND_INTEGRITY:
            raise ConfigError(
                f"govuk-frontend@{GOVUK_FRONTEND_VERSION} tarball does not match its pinned integrity "
                "hash; refusing to install it"
            )
        staging = work / "staging"
        staging.mkdir()
        _unpack(tarball, staging)
        missing = [name for name in REQUIRED if not (staging / name).exists()]
        if missing:
            raise ConfigError(f"govuk-frontend@{GOVUK_FRONTEND_VERSION} tarball lacks {', '.join(missing)}")
        (staging / _MARKER).write_text(GOVUK_FRONTEND_INTEGRITY + "\n", encoding="utf-8")
        old = work / "old"
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
    return folder
