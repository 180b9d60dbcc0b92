"""The user-facing docs stay short where they must, point only at what exists, and speak to users.

A clone has the README, CONTRIBUTING.md and docs/ and nothing else: every relative link and every
repository path they name must exist in the repository, and no page reads like a work diary.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_BUDGET_LINES = 200
SCREEN_LINES = 50  # what a terminal or a repository page shows before scrolling
PAGES = sorted([README, ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md"),
                ROOT / "container" / "kubernetes" / "README.md"])
# Paths of this repository as the pages spell them (`tests/test_plan.py`, `docs/cni.md`, ...).
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:istio_init|tests|scripts|docs|container|benchmarks|\.ci)/[\w./-]*)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# What a page about the product must not read like: a diary of its making.
_DIARY = [re.compile(pattern, re.I) for pattern in (
    r"\bsessions?\b", r"\bissue \d+", r"\bissues? #?\d+", r"\bfindings?\b", r"\b20\d\d-\d\d-\d\d\b",
    r"\b(?:yesterday|this round|earlier runs?|before this work)\b", r"shared/spec")] + [
    re.compile(r"\bRULES(?:-CURRENT)?\.md\b")]  # the rule sets are docs/rules-1.8.md and docs/rules-current.md


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_readme_fits_its_budget() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_BUDGET_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_install_a_dry_run_and_the_mesh_switch_over_are_on_the_first_two_screens() -> None:
    first = "\n".join(README.read_text().splitlines()[:2 * SCREEN_LINES])
    for wanted in ("## Install", "scripts/build-image", "## Quick start", " -n", "## Using it in a mesh",
                   "global.proxy_init.image", "container/kubernetes/istio/"):
        assert wanted in first, wanted


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_relative_link_exists(page: Path) -> None:
    missing = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        if not (page.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"{_ids(page)} links to missing {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_repository_path_named_exists(page: Path) -> None:
    missing = []
    for found in _REPO_PATH.findall(page.read_text()):
        path = found.rstrip(".,;")
        if not path.endswith("/") and not (ROOT / path).exists() and (ROOT / path.rsplit(".", 1)[0]).exists():
            path = path.rsplit(".", 1)[0]  # a sentence ending right after a path
        if not (ROOT / path).exists():
            missing.append(found)
    assert not missing, f"{_ids(page)} names missing {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_pages_speak_to_users_not_of_their_making(page: Path) -> None:
    text = page.read_text()
    if page.name == "performance.md":  # its one measured table says when and where it was measured
        text = re.sub(r"## The latest measurement\n.*?\n## ", "## ", text, flags=re.S)
    found = [match.group(0) for pattern in _DIARY for match in pattern.finditer(text)]
    assert not found, f"{_ids(page)}: {found}"


def test_the_checks_can_fail() -> None:
    """The patterns above find what they are for (a test that cannot fail proves nothing)."""
    assert _REPO_PATH.findall("see `tests/no_such_test.py::case` and docs/x.md.") == [
        "tests/no_such_test.py", "docs/x.md."]
    assert _LINK.findall("[a](docs/a.md) [b](https://example.com)") == ["docs/a.md", "https://example.com"]
    diary = "In this session we fixed finding 3 of issue 12 on 2026-12-01 (RULES.md)."
    assert sum(1 for pattern in _DIARY if pattern.search(diary)) >= 5
    assert not any(pattern.search("docs/rules-current.md and docs/rules-1.8.md") for pattern in _DIARY)
