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
    wanted: dict[Path, Path] = {}
    for package, source in package_dir.items():
        if Path(source).as_posix() != package.replace(".", "/"):  # else found in the working directory
            wanted[TREE / package.replace(".", "/")] = ROOT / source
    # Links are kept when right (another run may be reading them) and anything else is removed.
    # os.walk never follows the links, so nothing outside the tree is touched.
    for folder, dirs, files in os.walk(TREE, topdown=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                if wanted.get(path) != Path(os.readlink(path)):
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    shown: dict[str, str] = {}
    for link, source in wanted.items():
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=True)
        shown[f"{link.relative_to(ROOT).as_posix()}/"] = f"{source.relative_to(ROOT).as_posix()}/"
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
