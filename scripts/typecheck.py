"""Run mypy on the package as it is installed (the README's test command calls this).

pyproject's package-dir installs schemas/, producers/, consumers/ and adapters/ as
referral_broker.schemas and so on. The editable install resolves that with an import hook that
mypy does not follow, so this script mirrors the mapping as a tree of directory links under
.mypy_cache/package-tree (pyproject's [tool.mypy] mypy_path), runs mypy with the settings in
pyproject, and prints paths as the files' real places in the repository.

Usage: .venv/bin/python scripts/typecheck.py [mypy arguments]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_cache" / "package-tree"


def build_tree() -> dict[str, str]:
    """Link every package-dir entry that is not already at its import path; return link -> source."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    shown: dict[str, str] = {}
    for package, source in package_dir.items():
        import_path = package.replace(".", "/")
        if Path(source).as_posix() == import_path:
            continue  # found in the working directory as it is
        link = TREE / import_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / source, target_is_directory=True)
        shown[f"{link.relative_to(ROOT).as_posix()}/"] = f"{Path(source).as_posix()}/"
    return shown


def main(argv: list[str]) -> int:
    shown = build_tree()
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *argv], cwd=ROOT, capture_output=True, text=True, env=os.environ
    )
    out = proc.stdout
    for link, source in shown.items():
        out = out.replace(link, source)
    sys.stdout.write(out)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
