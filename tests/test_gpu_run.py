"""The prepared GPU run (reports/gpu-llava-1.5-7b-shapes/checks.sh) names only modules and tests that
exist: a GPU slot is rare, and a renamed module must fail here, not there."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "reports" / "gpu-llava-1.5-7b-shapes"


def test_checks_script_names_existing_modules_and_tests():
    script = (FOLDER / "checks.sh").read_text()
    modules = set(re.findall(r"python3 -m ([\w.]+)", script)) - {"pip", "pytest"}
    assert modules == {"hybrid_tools.parity", "hybrid_tools.bench"}
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    tests = re.findall(r"tests/test_\w+\.py", script)
    assert tests and all((REPO / test).is_file() for test in tests)


def test_ingest_takes_what_checks_writes_and_regenerate_reads_it():
    script, ingest, regenerate = ((FOLDER / name).read_text() for name in ("checks.sh", "ingest.sh", "regenerate.sh"))
    written = set(re.findall(r'"\$OUT/([\w.-]+)', script))
    taken = set(re.search(r"for item in ([^;]+);", ingest).group(1).split())
    assert written == taken
    for bench in ("bench-bs1", "bench-bs16", "bench-next", "parity.json"):
        assert bench in regenerate


def test_the_prepare_command_carries_the_spares_that_checks_falls_back_on():
    """transformers checks huggingface_hub, tokenizers and safetensors versions at import (5.25: hub
    >= 2.4, tokenizers >= 0.23.1, safetensors >= 0.8), and the GPU machine's, made for 5.17, may be
    older: the prepare command must carry versions the transformers it carries (the one installed
    here) accepts, and the script must put each in front when the import fails."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from transformers.dependency_versions_table import deps

    script, readme = ((FOLDER / name).read_text() for name in ("checks.sh", "README.md"))
    command = re.search(r"bash \.\./shared/gpu/prepare\.sh ([^&]+)&&", readme).group(1).split()
    carried = dict(argument.split("==") for argument in command)
    assert set(carried) == {"huggingface_hub", "httpx2", "httpcore2", "truststore", "tokenizers", "safetensors"}
    for package in ("huggingface_hub", "tokenizers", "safetensors"):
        requirement = deps[package.replace("_", "-")]
        assert carried[package] in SpecifierSet(requirement.removeprefix(package.replace("_", "-"))), (package, carried[package], requirement)
    # hub 2.x imports httpx2, which imports httpcore2 and truststore; the device has none of them (its hub
    # 1.33 uses httpx): each travels in a version the one importing it accepts
    importers = {"httpx2": "huggingface_hub", "httpcore2": "httpx2", "truststore": "httpx2"}
    for package, importer in importers.items():
        specs = [Requirement(r) for r in requires(importer) if "extra ==" not in r and Requirement(r).name == package]
        assert specs and carried[package] in specs[0].specifier, (package, carried[package], specs)
    for package in carried:
        assert f"{package}-*" in script
    assert f"bash ../shared/gpu/prepare.sh {' '.join(command)} &&" in script
