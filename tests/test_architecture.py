"""The floors (docs/ARCHITECTURE.md): every import, at any depth of a module, points down.

    cli            -> anything
    consumers      -> producers, adapters, core, contract   (the inbox replies with statuses)
    producers      -> adapters, core, contract
    adapters       -> core, contract
    core           -> contract, errors                      (referral_broker/ outside cli/)
    contract       -> errors                                (schemas/)
    errors         -> nothing of ours

Imports are read from the source with ``ast`` (those inside functions too, relative ones
resolved) and mapped to floors through pyproject's ``package-dir``, so a folder that installs
under another name is judged by where it really is.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "cli": {"cli", "consumers", "producers", "adapters", "core", "contract", "errors"},
    "consumers": {"consumers", "producers", "adapters", "core", "contract", "errors"},
    "producers": {"producers", "adapters", "core", "contract", "errors"},
    "adapters": {"adapters", "core", "contract", "errors"},
    "core": {"core", "contract", "errors"},
    "contract": {"contract", "errors"},
    "errors": {"errors"},
}


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def floor_of(module: str) -> str | None:
    """The floor of an import name of ours; None for a third-party or standard module."""
    parts = module.split(".")
    if parts[0] != "referral_broker":
        return None
    if module == "referral_broker.errors":
        return "errors"
    second = parts[1] if len(parts) > 1 else ""
    return {
        "schemas": "contract",
        "producers": "producers",
        "consumers": "consumers",
        "adapters": "adapters",
        "cli": "cli",
    }.get(second, "core")


def modules() -> dict[str, Path]:
    """Import name -> source file, for every module the package installs."""
    found: dict[str, Path] = {}
    dirs = package_dirs()
    for package, folder in sorted(dirs.items(), key=lambda item: len(item[0])):
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            inner = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *inner])
            # a deeper package-dir entry owns its folder; skip it from the outer one
            if any(
                path.is_relative_to(other) and len(other_pkg) > len(package)
                for other_pkg, other in dirs.items()
            ):
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path, source: str | None = None) -> list[tuple[int, str]]:
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from referral_broker import adapters`` imports the subpackage
            out += [
                (node.lineno, f"{target}.{alias.name}")
                for alias in node.names
                if target == "referral_broker" and alias.name != "*"
            ]
    return out


def violations(name: str, path: Path, source: str | None = None) -> list[str]:
    own = floor_of(name)
    assert own is not None
    found = []
    for line, target in imports_of(name, path, source):
        floor = floor_of(target)
        if target == "referral_broker":
            continue
        if floor is not None and floor not in ALLOWED[own]:
            found.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {target} ({floor})")
    return found


def test_every_module_is_mapped() -> None:
    found = modules()
    assert "referral_broker.schemas.registry" in found
    assert found["referral_broker.schemas.registry"] == ROOT / "schemas" / "registry.py"
    assert "referral_broker.consumers.router" in found
    assert len(found) > 60


def test_imports_only_run_down_the_floors() -> None:
    problems = [v for name, path in modules().items() for v in violations(name, path)]
    assert not problems, "imports running up a floor:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        (
            "referral_broker.identity",
            "def f():\n    from referral_broker.consumers import router\n",
            "consumers",
        ),
        ("referral_broker.schemas.validation", "from referral_broker.parties import all_parties\n", "core"),
        ("referral_broker.producers.intake", "from ..consumers.receiving import receive\n", "consumers"),
        ("referral_broker.sealing.bench", "from referral_broker import adapters\n", "adapters"),
        ("referral_broker.errors", "from referral_broker.config import Settings\n", "core"),
    ],
)
def test_the_walker_catches_an_upward_import(name: str, source: str, expected: str) -> None:
    path = modules()[name]
    found = violations(name, path, source)
    assert len(found) == 1 and found[0].endswith(f"({expected})"), found


def test_allowed_imports_are_not_flagged() -> None:
    path = modules()["referral_broker.consumers.router"]
    source = (
        "from referral_broker.producers import outbox\nfrom .dead_letters import dead_letter\nimport json\n"
    )
    assert violations("referral_broker.consumers.router", path, source) == []
