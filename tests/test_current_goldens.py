"""The current rule set against Istio's own 27 capture goldens.

Pure tests (no root): the dry run equals the stored canonical text, and each
chain's jump targets come in the order Istio's golden creates them. Root
tests: Istio's golden, loaded into a fresh namespace by the legacy and the nft
restore tools, reads back as the stored canonical text (so that text is
Istio's, converted by the kernel); and istio-init itself, applied for real with
each backend, leaves exactly that text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cases_current import CURRENT_CASES, GROUP_GIDS, CurrentCase
from clirun import invoke
from istio_golden import (BACKEND_TOOLS, TOOLS, assert_kernel_reads_back_as_stored, assert_real_apply_holds_golden,
                          final_targets, resolv_env, restore_inputs, tables_in_order)
from istio_init.iptables_save.write import split_families
from istio_init.iptables_save.read import parse_save
from nsutil import Namespace



def test_every_istio_golden_is_a_case() -> None:
    names = {path.stem for path in CURRENT_CASES[0].istio_golden.parent.glob("*.golden")}
    assert len(names) == 27
    assert names == {case.name for case in CURRENT_CASES}
    assert len(CURRENT_CASES) == 27


@pytest.mark.parametrize("case", CURRENT_CASES, ids=lambda c: c.name)
def test_dry_run_matches_converted_istio_golden(case: CurrentCase, tmp_path: Path) -> None:
    result = invoke(case.argv(), resolv_env(case, tmp_path))
    assert result.code == 0, result.stderr
    assert result.stdout == case.golden.read_text()


@pytest.mark.parametrize("case", CURRENT_CASES, ids=lambda c: c.name)
def test_chain_order_matches_istio_golden_without_a_kernel(case: CurrentCase, tmp_path: Path) -> None:
    """Istio's text, its -A and -I N applied in order, against our plan: same targets per chain."""
    ours = invoke(case.argv(), resolv_env(case, tmp_path)).stdout
    for istio_text, our_text in zip(restore_inputs(case.istio_golden.read_text(), GROUP_GIDS),
                                    split_families(ours)):
        assert bool(istio_text) == bool(our_text)
        planned = {(name, chain): [_target(r.spec) for r in table.rules if r.chain == chain]
                   for name, table in parse_save(our_text).items() for chain in {r.chain for r in table.rules}}
        assert planned == final_targets(istio_text)
        assert tables_in_order(our_text) == tables_in_order(istio_text)


@pytest.mark.root
@pytest.mark.parametrize("flavour", sorted(TOOLS))
@pytest.mark.parametrize("case", CURRENT_CASES, ids=lambda c: c.name)
def test_istio_golden_loaded_by_the_kernel_reads_back_as_stored_text(case: CurrentCase, flavour: str,
                                                                      netns: Namespace) -> None:
    inputs = restore_inputs(case.istio_golden.read_text(), GROUP_GIDS)
    assert_kernel_reads_back_as_stored(netns, case, inputs, flavour)


@pytest.mark.root
@pytest.mark.parametrize("backend", sorted(BACKEND_TOOLS))
@pytest.mark.parametrize("case", CURRENT_CASES, ids=lambda c: c.name)
def test_real_apply_reads_back_as_istio_golden(case: CurrentCase, backend: str, netns: Namespace,
                                               tmp_path: Path) -> None:
    assert_real_apply_holds_golden(netns, case, backend, tmp_path)


def _target(spec: str) -> str:
    words = spec.split()
    return words[words.index("-j") + 1]
