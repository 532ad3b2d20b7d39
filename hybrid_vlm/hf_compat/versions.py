"""Which transformers releases hybrid-vlm supports, and the one it is running on."""

from __future__ import annotations

import os
import re
import warnings

import transformers

# The oldest and the newest transformers minor release the whole test suite passes on.
SUPPORTED_TRANSFORMERS = ("5.23", "5.25")
# Set to 1 to import on an untested release anyway: for porting (patches/README.md), never for results.
UNTESTED_TRANSFORMERS_ENV = "HYBRID_VLM_ALLOW_UNTESTED_TRANSFORMERS"


def minor_release(version: str) -> tuple[int, int]:
    """(major, minor) of a release string: '5.24.0' and '5.24.1.dev0' both give (5, 24)."""
    major, minor = version.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


def is_supported_transformers(version: str) -> bool:
    oldest, newest = (minor_release(v) for v in SUPPORTED_TRANSFORMERS)
    return oldest <= minor_release(version) <= newest


def check_transformers_version(version: str | None = None, environ: dict | None = None) -> None:
    version = transformers.__version__ if version is None else version
    environ = os.environ if environ is None else environ
    if is_supported_transformers(version):
        return
    oldest, newest = SUPPORTED_TRANSFORMERS
    if environ.get(UNTESTED_TRANSFORMERS_ENV) == "1":
        warnings.warn(
            f"hybrid-vlm is tested on transformers {oldest}.x to {newest}.x, running on {version} because "
            f"{UNTESTED_TRANSFORMERS_ENV}=1: logits may be silently wrong until the test suite passes on it.",
            stacklevel=2,
        )
        return
    raise ImportError(
        f"hybrid-vlm supports transformers {oldest}.x to {newest}.x only, found {version}. "
        f"Install a supported release with: pip install 'transformers>={oldest},<{next_minor(newest)}'. "
        "Porting to another release means re-checking every item in hybrid_vlm/hf_compat/ "
        f"(checklist in patches/README.md; {UNTESTED_TRANSFORMERS_ENV}=1 imports it anyway, for that only)."
    )


def next_minor(release: str) -> str:
    major, minor = minor_release(release)
    return f"{major}.{minor + 1}"


TRANSFORMERS_RELEASE = minor_release(transformers.__version__)
