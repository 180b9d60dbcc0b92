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
