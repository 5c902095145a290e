"""The user's top-level layout installs under one import package, with nothing left out."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_folder_is_a_listed_package() -> None:
    mapped = {folder: name for name, folder in TOOL["package-dir"].items()}
    expected = set()
    for folder, name in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            expected.add(".".join([name, *rel.parts]) if rel.parts else name)
    listed = set(TOOL["packages"])
    assert expected <= listed
    # the rest are data folders inside a package (listed so setuptools installs them quietly)
    for extra in listed - expected:
        parent, _, leaf = extra.rpartition(".")
        folder = ROOT / mapped_folder(parent) / leaf
        assert folder.is_dir() and not list(folder.glob("*.py")), extra


def mapped_folder(package: str) -> Path:
    """The source folder of an import package, through package-dir."""
    best = max((n for n in TOOL["package-dir"] if package == n or package.startswith(n + ".")), key=len)
    rest = package[len(best) :].lstrip(".")
    return Path(TOOL["package-dir"][best], *rest.split(".")) if rest else Path(TOOL["package-dir"][best])


def test_stage_folders_install_under_referral_broker_only() -> None:
    for folder in ("schemas", "producers", "consumers", "adapters"):
        assert TOOL["package-dir"][f"referral_broker.{folder}"] == folder
    assert all(p == "referral_broker" or p.startswith("referral_broker.") for p in TOOL["packages"])
