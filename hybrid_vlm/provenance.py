"""What made a number: package versions and the git state of this checkout (bench, sweep, run.py)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "ms-vlmeval", "hybrid-vlm", "pandas")


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_state() -> tuple[str | None, bool | None]:
    """(commit, tracked files changed since it) of the checkout hybrid_vlm runs from; (None, None) outside git.

    Untracked files (outputs, reports being written) do not count: they do not change what ran.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit, bool(dirty)) if commit else (None, None)
