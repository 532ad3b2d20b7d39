"""A device run's own checks in a report: each step's exit status from its log (`== NAME: rc=N after Ts`
lines, as `reports/gpu-llava-1.5-7b-shapes/checks.sh` writes them) and the test results of its
pytest step (a JUnit XML file), so that a test failing on CUDA shows beside the figures."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from .markdown import md_table

STEP_LINE = re.compile(r"^== (?P<name>\S+): rc=(?P<rc>\d+) after (?P<seconds>\d+)s$")
START_LINE = re.compile(r"^== (?P<name>\S+) \(limit (?P<limit>\d+)s\): ")
NOT_FINISHED = "not finished: the run was stopped during it"
EXIT_MEANINGS = {0: "done", 124: "stopped at its time limit", 130: "interrupted at its time limit", 137: "killed after its time limit"}


@dataclass
class TestResults:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # "file::test: first line of the message"


def read_steps(path: Path) -> list[tuple[str, int | None, int | None]]:
    """(step, exit status, seconds) for every step the log started, in order, a step run twice
    twice; (step, None, None) for one it started and never ended (the run was stopped during it)."""
    steps: list[list] = []
    for line in path.read_text(errors="replace").splitlines():
        if ended := STEP_LINE.match(line.strip()):
            running = next((step for step in reversed(steps) if step[0] == ended["name"] and step[1] is None), None)
            if running is None:  # an end without its start line (a log cut at its head)
                running = [ended["name"], None, None]
                steps.append(running)
            running[1:] = [int(ended["rc"]), int(ended["seconds"])]
        elif started := START_LINE.match(line.strip()):
            steps.append([started["name"], None, None])
    return [tuple(step) for step in steps]


def read_pytest(path: Path) -> TestResults:
    """Counts and failed tests of a JUnit XML file (pytest --junitxml); a ValueError if it is not one."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise ValueError(f"--pytest {path}: not a JUnit XML file ({error})") from None
    results = TestResults()
    for case in root.iter("testcase"):
        results.tests += 1
        for kind, counter in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            outcome = case.find(kind)
            if outcome is None:
                continue
            setattr(results, counter, getattr(results, counter) + 1)
            if kind != "skipped":
                message = (outcome.get("message") or "").strip().splitlines()
                results.failed.append(f"{case.get('classname', '?')}::{case.get('name', '?')}: {message[0] if message else kind}")
    return results


def device_check_lines(steps: list | None, tests: TestResults | None, sources: dict[str, str]) -> list[str]:
    lines = ["## The device run's steps and tests", ""]
    if steps is not None:
        rows = [[name, "–", NOT_FINISHED, "–"] if rc is None else [name, str(rc), EXIT_MEANINGS.get(rc, "failed"), str(seconds)]
                for name, rc, seconds in steps]
        lines += [f"From `{sources['steps']}`:", "", md_table(["step", "exit status", "meaning", "seconds"], rows, align="lrlr"), ""]
    if tests is not None:
        lines += [f"From `{sources['tests']}`: {tests.tests} tests ran, {tests.failures} failed, {tests.errors} errors, "
                  f"{tests.skipped} skipped" + ("." if not tests.failed else ":"), ""]
        lines += [f"- {failure}" for failure in tests.failed] + ([""] if tests.failed else [])
    return lines
