"""The rule sets of Istio 1.9 to 1.25 against each release's own expected rules (cases_generations.py).

Pure: the dry run of each case equals the stored canonical text (table by
table). Root: Istio's expected rules, loaded into a fresh namespace by the
legacy and the nft restore tools, read back as that stored text (so the text is
Istio's, converted by the kernel); and istio-init, applied for real with each
backend, leaves exactly that text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cases_generations import GENERATION_CASES, GROUP_GIDS, GenerationCase
from clirun import invoke
from istio_golden import (BACKEND_TOOLS, TOOLS, any_restore_inputs, assert_kernel_reads_back_as_stored,
                          assert_real_apply_holds_golden, resolv_env)
from istio_init.render import split_families
from nsutil import Namespace



def _blocks(text: str) -> list[dict[str, str]]:
    """Per family, table name -> its block of iptables-save text (the order of tables means nothing)."""
    out = []
    for family in split_families(text):
        blocks: dict[str, str] = {}
        name = ""
        for line in family.splitlines(keepends=True):
            if line.startswith("*"):
                name = line[1:].strip()
            blocks[name] = blocks.get(name, "") + line
        out.append(blocks)
    return out


def test_every_carried_golden_is_a_case() -> None:
    carried = {(p.parent.name, p.stem) for p in Path(GENERATION_CASES[0].istio_golden).parents[1].glob("*/*.golden")}
    assert carried == {(case.tag, case.name) for case in GENERATION_CASES}
    assert len(GENERATION_CASES) == 175


@pytest.mark.parametrize("case", GENERATION_CASES, ids=lambda c: c.id)
def test_dry_run_matches_converted_istio_golden(case: GenerationCase, tmp_path: Path) -> None:
    result = invoke(case.argv(), resolv_env(case, tmp_path))
    assert result.code == 0, result.stderr
    assert _blocks(result.stdout) == _blocks(case.golden.read_text())


@pytest.mark.root
@pytest.mark.parametrize("flavour", sorted(TOOLS))
@pytest.mark.parametrize("case", GENERATION_CASES, ids=lambda c: c.id)
def test_istio_golden_loaded_by_the_kernel_reads_back_as_stored_text(case: GenerationCase, flavour: str,
                                                                      netns: Namespace) -> None:
    inputs = any_restore_inputs(case.istio_golden.read_text(), GROUP_GIDS)
    assert_kernel_reads_back_as_stored(netns, case, inputs, flavour)


@pytest.mark.root
@pytest.mark.parametrize("backend", sorted(BACKEND_TOOLS))
@pytest.mark.parametrize("case", GENERATION_CASES, ids=lambda c: c.id)
def test_real_apply_reads_back_as_istio_golden(case: GenerationCase, backend: str, netns: Namespace,
                                               tmp_path: Path) -> None:
    assert_real_apply_holds_golden(netns, case, backend, tmp_path)
