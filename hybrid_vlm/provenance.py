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


SIGNATURE_SAMPLE_BYTES = 4096  # per tensor, from each end of its data
SIGNATURE_SAMPLES = 64  # evenly spaced reads of a weights file that is not safetensors


def replace_file(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole: through a scratch file beside it and an atomic rename, so that a
    kill mid-write leaves the previous file (or none), never a torn one."""
    path = Path(path)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def checkpoint_signature(folder: str | Path) -> str:
    """A content signature of a checkpoint folder, cheap even at 7B: sha256 over config.json's
    settings (its `transformers_version` left out) and, per weights file transformers loads
    (`*.safetensors`, else `pytorch_model*.bin`), each tensor's name, dtype, shape and the first and
    last 4 KiB of its data (a `.bin`: 64 evenly spaced 4 KiB reads).

    The same checkpoint moved, copied or re-saved by another release into the same files and dtype
    keeps it (re-sharded or cast, it does not: file names and dtypes are signed). A fine-tune of the
    same shape changes it wherever it changed a tensor's first or last 4 KiB, which a full, merged
    or projector-only fine-tune does; a change confined to the middle of every tensor it touched
    would not show."""
    folder = Path(folder)
    digest = hashlib.sha256()
    digest.update(config_settings(folder / "config.json").encode())
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    for path in weights:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            if path.suffix == ".safetensors":
                safetensors_samples(handle, digest)
            else:
                size = path.stat().st_size
                digest.update(str(size).encode())
                for sample in range(SIGNATURE_SAMPLES):
                    handle.seek(size * sample // SIGNATURE_SAMPLES)
                    digest.update(handle.read(SIGNATURE_SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:16]


def config_settings(path: Path) -> str:
    """config.json as sorted JSON without `transformers_version` (which a re-save under another
    release rewrites); "" when missing or unreadable."""
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if isinstance(config, dict):
        config.pop("transformers_version", None)
    return json.dumps(config, sort_keys=True)


def safetensors_samples(handle, digest) -> None:
    """Feed `digest` each tensor's name, dtype, shape and the first and last SIGNATURE_SAMPLE_BYTES
    of its data, read through the file's header (8-byte little-endian length, then JSON offsets)."""
    import json

    header_size = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(header_size))
    base = 8 + header_size
    for name in sorted(key for key in header if key != "__metadata__"):
        entry = header[name]
        begin, end = entry["data_offsets"]
        digest.update(f"{name}:{entry['dtype']}:{entry['shape']}".encode())
        for offset in sorted({begin, max(begin, end - SIGNATURE_SAMPLE_BYTES)}):
            handle.seek(base + offset)
            digest.update(handle.read(min(SIGNATURE_SAMPLE_BYTES, end - offset)))
