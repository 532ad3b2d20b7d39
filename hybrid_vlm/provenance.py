"""What made a number: package versions, the git state of this checkout, and paths written so that
provenance names no machine (bench, sweep, run.py)."""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
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


REPO_ROOT = Path(__file__).resolve().parent.parent


def portable_path(path: str | Path) -> str:
    """A path as committed provenance may hold it: relative to the current directory or to this
    checkout when it lies below one of them, under `~` when below the home directory, else only
    its last component after "…/" (the rest names a machine, not a result)."""
    text = str(path)
    candidate = Path(text)
    if not candidate.is_absolute():
        return text
    candidate = Path(os.path.normpath(candidate))
    for base in (Path.cwd(), REPO_ROOT):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix() or "."
    home = Path.home()
    if candidate.is_relative_to(home):
        return "~/" + candidate.relative_to(home).as_posix()
    return "…/" + candidate.name


def portable(value):
    """`value` (JSON-like: dicts, lists, strings) with every absolute path made portable, also in
    `--flag=/abs/path` and `KEY=/abs/path` strings."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    if not isinstance(value, str):
        return value
    if value.startswith("/"):
        return portable_path(value)
    prefix, separator, rest = value.partition("=")
    if separator and rest.startswith("/") and " " not in prefix:
        return f"{prefix}={portable_path(rest)}"
    return value


def shell_join(argv) -> str:
    """shlex.join, except that a leading `~/` stays unquoted so the shell still expands it."""
    return " ".join("~/" + shlex.quote(a[2:]) if a.startswith("~/") and a[2:] else shlex.quote(a) for a in map(str, argv))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SIGNATURE_SAMPLES = 16  # evenly spaced reads per weights file
SIGNATURE_SAMPLE_BYTES = 1 << 16


def checkpoint_signature(folder: str | Path) -> str:
    """A content signature of a checkpoint folder, cheap even at 7B: sha256 over config.json and,
    per weights file, its name, size and 16 evenly spaced 64 KiB samples of its bytes.

    The same checkpoint moved or copied keeps it; a fine-tune of the same shape changes it (a full
    or merged fine-tune rewrites the bytes every sample reads), so a results folder can tell
    whether its predictions came from this checkpoint without hashing gigabytes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for sample in range(SIGNATURE_SAMPLES):
                handle.seek(size * sample // SIGNATURE_SAMPLES)
                digest.update(handle.read(SIGNATURE_SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:16]
