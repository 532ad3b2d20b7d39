"""The transformers release gate: which releases import, and the bypass for porting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hybrid_vlm.hf_compat import (
    SUPPORTED_TRANSFORMERS,
    UNTESTED_TRANSFORMERS_ENV,
    check_transformers_version,
    is_supported_transformers,
)
from hybrid_vlm.hf_compat.versions import next_minor


@pytest.mark.parametrize("version", ["5.23.0", "5.23.4", "5.24.0", "5.24.1", "5.25.0", "5.25.0.dev0"])
def test_tested_releases_import(version):
    assert is_supported_transformers(version)
    check_transformers_version(version, environ={})


@pytest.mark.parametrize("version", ["5.22.2", "5.26.0", "5.26.0.dev0", "6.0.0", "4.57.6", "5.2.0", "5.230.0"])
def test_other_releases_are_refused_with_the_range(version):
    with pytest.raises(ImportError, match=r"supports transformers 5\.23\.x to 5\.25\.x only, found " + version.replace(".", r"\.")) as error:
        check_transformers_version(version, environ={})
    assert "pip install 'transformers>=5.23,<5.26'" in str(error.value)
    assert "patches/README.md" in str(error.value)


def test_bypass_imports_an_untested_release_with_a_warning():
    with pytest.warns(UserWarning, match=r"5\.26\.0 because HYBRID_VLM_ALLOW_UNTESTED_TRANSFORMERS=1"):
        check_transformers_version("5.26.0", environ={UNTESTED_TRANSFORMERS_ENV: "1"})
    with pytest.raises(ImportError):
        check_transformers_version("5.26.0", environ={UNTESTED_TRANSFORMERS_ENV: "0"})


REPO = Path(__file__).parents[1]


def declared_transformers(requirements: list[str]) -> Requirement:
    (requirement,) = [Requirement(line) for line in requirements if line.startswith("transformers")]
    return requirement


@pytest.mark.parametrize("source", ["pyproject.toml", "requirements-eval.txt"])
def test_declared_range_matches_the_gate(source):
    """pip must keep every release the import gate accepts, and install nothing it refuses."""
    text = (REPO / source).read_text()
    if source == "pyproject.toml":
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        requirement = declared_transformers(tomllib.loads(text)["project"]["dependencies"])
    else:
        requirement = declared_transformers([line.strip() for line in text.splitlines()])
    oldest, newest = SUPPORTED_TRANSFORMERS
    for version in (f"{oldest}.0", f"{newest}.0", f"{newest}.3"):
        assert requirement.specifier.contains(version), (source, str(requirement), version)
    for version in ("5.22.2", f"{next_minor(newest)}.0", "6.0.0"):
        assert not requirement.specifier.contains(version), (source, str(requirement), version)


def shell_assignment(path: Path, pattern: str) -> str:
    found = re.search(pattern, path.read_text(), re.M)
    assert found is not None, f"{path.name}: no line matching {pattern}"
    return found.group(1)


def test_install_and_ci_cover_every_supported_release():
    """install.sh defaults to the newest supported release, on which CI runs the whole suite; .ci/run
    then runs the engine tests on each older supported minor release, none left out."""
    oldest, newest = SUPPORTED_TRANSFORMERS
    assert shell_assignment(REPO / "install.sh", r"^TRANSFORMERS=\$\{TRANSFORMERS:-([^}]+)\}$") == f"{newest}.*"
    older = shell_assignment(REPO / ".ci" / "run", r"^OLDER_TRANSFORMERS=\(([^)]*)\)$").split()
    expected, release = [], oldest
    while release != newest:
        expected.append(f"{release}.*")
        release = next_minor(release)
    assert older == expected


def test_checkpoints_load_without_hub_kernels():
    """transformers 5.25 kernelizes from_pretrained models by default (a hub rotary kernel inside
    LlamaAttention on CUDA), which the engine's layer loop does not call: the stock model would no
    longer be its reference. The loaders ask for none (use_kernels was True here without it)."""
    from hybrid_vlm.model import load_supported_model
    from hybrid_vlm.testbed import load_for_training
    from hybrid_vlm.tiny import ensure_tiny_llava

    checkpoint = ensure_tiny_llava()
    assert load_supported_model(str(checkpoint)).use_kernels is False
    assert load_for_training(checkpoint)[0].use_kernels is False


MODEL_LOAD = re.compile(r"\b(\w*(?:Model|ForConditionalGeneration|ForImageTextToText|model_class))\.from_pretrained\(")


def call_arguments(text: str, start: int) -> str:
    """The text between the parenthesis opening at `start` and its match (calls may span lines)."""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1 : end]
    return text[start + 1 :]


def test_every_model_load_in_the_code_asks_for_no_hub_kernels():
    """A source check, so a new loader cannot bring them back (on a machine without the `kernels`
    package, 5.25's default even fails the load): each model class's from_pretrained call in the
    package, the plugin, the tools, the tests and the reports' scripts passes NO_HUB_KERNELS."""
    calls = []
    for folder in ("hybrid_vlm", "vlmeval_plugin", "hybrid_tools", "tests", "reports"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for match in MODEL_LOAD.finditer(text):
                where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
                calls.append((where, "NO_HUB_KERNELS" in call_arguments(text, match.end() - 1)))
    assert len(calls) >= 15, calls
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]
