"""The plan's data types: the bulk constructor builds exactly what the NamedTuple constructors build."""

from __future__ import annotations

from istio_init.model import APPEND, Rule, Step, destination_appends


def test_destination_appends_equal_the_constructors_steps() -> None:
    destinations = ["192.0.2.1/32", "198.51.100.0/24", "2001:db8::/32"]
    built = destination_appends("nat", "ISTIO_OUTPUT", "RETURN", destinations)
    expected = [Step(APPEND, Rule("nat", "ISTIO_OUTPUT", "RETURN", destination=d)) for d in destinations]
    assert built == expected
    assert all(type(step) is Step and type(step.rule) is Rule for step in built)
    assert [step.rule.destination for step in built] == destinations
    assert built[0].position == 1 and built[0].rule.matches == () and built[0].rule.negate_destination is False


def test_destination_appends_of_nothing_is_nothing() -> None:
    assert destination_appends("nat", "ISTIO_OUTPUT", "RETURN", []) == []


def test_a_plans_tables_and_chains_skip_destination_runs_and_agree_with_every_step() -> None:
    """tables() and chains() look at one step of each -x run (model.destination_runs): the same answers."""
    from unittest import mock

    from istio_init import model
    from istio_init.model import FamilyPlan

    before = [Step(APPEND, Rule("mangle", "ISTIO_DIVERT", "ACCEPT"))]
    run = destination_appends("nat", "ISTIO_OUTPUT", "RETURN", [f"10.0.{i >> 8}.{i & 255}/32" for i in range(500)])
    after = [Step(APPEND, Rule("raw", "ISTIO_X", "ISTIO_Y")), Step(APPEND, Rule("nat", "ISTIO_Z", "RETURN"))]
    family = FamilyPlan(4, tuple([*before, *run, *after]))
    assert list(model.destination_runs(family.steps)) == [1]
    found = (family.tables(), {t: family.chains(t) for t in ("nat", "mangle", "raw")})
    with mock.patch.object(model, "DESTINATION_RUN_MIN", 10**9):
        assert model.destination_runs(family.steps) == {}
        assert found == (family.tables(), {t: family.chains(t) for t in ("nat", "mangle", "raw")})
    assert found[0] == ["mangle", "nat", "raw"] and found[1]["nat"] == ["ISTIO_OUTPUT", "ISTIO_Z"]
