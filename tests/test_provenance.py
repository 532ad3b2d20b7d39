"""Provenance names no machine: portable paths, and no committed file holding this machine's paths."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from hybrid_vlm.provenance import REPO_ROOT, portable, portable_path


def test_portable_paths(tmp_path, monkeypatch):
    home, work = tmp_path / "home" / "someone", tmp_path / "elsewhere" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert portable_path(work / "outputs" / "m") == "outputs/m"
    assert portable_path(work) == "."
    assert portable_path(home / ".cache" / "hybrid_vlm" / "tiny-llava-v1") == "~/.cache/hybrid_vlm/tiny-llava-v1"
    assert portable_path(REPO_ROOT / "reports" / "x") == "reports/x"
    assert portable_path("/opt/data/mid.json") == "…/mid.json"
    assert portable_path("runs/bench") == "runs/bench"  # relative paths stay as typed
    record = {"argv": ["--out", str(work / "b"), f"--dymu={home}/t.json"], "env": {"MMEVAL_ROOT": str(work / "o")}, "n": 3}
    assert portable(record) == {"argv": ["--out", "b", "--dymu=~/t.json"], "env": {"MMEVAL_ROOT": "o"}, "n": 3}


def committed_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
        files = [REPO_ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build outputs
        files = [p for p in REPO_ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    this_test = Path(__file__).resolve()  # it names the markers it looks for
    return [p for p in files if p.suffix not in (".png", ".xlsx", ".pkl") and p.is_file() and p.resolve() != this_test]


def test_no_committed_file_holds_a_machine_path():
    machine = {str(Path.home()) + "/", str(REPO_ROOT) + "/", str(Path(tempfile.gettempdir()).resolve()) + "/", "/root/", "/home/", "/Users/"}
    found = []
    for path in committed_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO_ROOT)}: {marker}" for marker in sorted(machine) if marker in text]
    assert not found, found
