"""The flag rows (config.FLAGS) and the values they give the Config: what follows from a row, per flag."""

from __future__ import annotations

import pytest

from istio_init.config import (EVERYTHING, FLAGS, RULE_SET_RELEASES, AllOrList, Config, FlagSpec, flag, from_sources,
                               option_words)
from istio_init.records import NamedTuple, declarations


@pytest.mark.parametrize("given,inbound,outbound", [
    ({"inbound_ports": "*", "service_cidr": "*"}, "*", "*"),
    ({"inbound_ports": "80,8080", "service_cidr": "10.0.0.0/8,fd00::/8"}, "80,8080", "10.0.0.0/8,fd00::/8"),
    ({}, "", ""),
])
def test_wildcard_or_list_is_one_value(given: dict[str, str | bool | None], inbound: str, outbound: str) -> None:
    """-b and -i are each '*' or a list in one value: str() spells it back; it is true when it selects anything."""
    config = from_sources(given, environ={})
    assert (str(config.inbound_ports), str(config.outbound_cidrs)) == (inbound, outbound)
    assert bool(config.inbound_ports) == config.inbound_enabled == bool(inbound)
    assert config.inbound_ports.all == (inbound == "*") and config.outbound_cidrs.all == (outbound == "*")


def test_every_config_field_but_sources_is_declared_with_its_row() -> None:
    """The row is the field's declaration: one row per field, the row names it, FLAGS lists it in field order."""
    rows = declarations(Config)
    assert list(rows) == [name for name in Config._fields if name != "sources"]
    assert all(isinstance(spec, FlagSpec) and spec.field == name for name, spec in rows.items())
    assert [spec.field for spec in FLAGS if spec.field] == list(rows)
    assert all(spec.no_effect or spec.parser == "checked_by_backend" for spec in FLAGS if not spec.field)


@pytest.mark.parametrize("rule_set", sorted(RULE_SET_RELEASES))
def test_each_rows_spelled_default_gives_its_fields_default(rule_set: str) -> None:
    """A flag left out parses its row's default text into exactly the field's declared default."""
    parsed = from_sources({"rules_version": rule_set}, environ={"ENVOY_USER": "no-such-user-here"})
    assert parsed._replace(sources={}) == Config(rules_version=rule_set, sources={})


def test_a_declared_field_becomes_a_row_named_after_it() -> None:
    """`flag` in a record's body: the field keeps the default, the row takes the field's name and the default's spelling."""

    class Settings(NamedTuple):
        listen_port: int = flag(8080, "l", "listen-port", "LISTEN_PORT", "Port.", parser="port")
        peers: tuple[int, ...] = flag((1, 2), None, "peer-ids", None, "Peers.", dest="peer", parser="id_list")
        everything: AllOrList[int] = flag(EVERYTHING, None, "all", None, "All.", parser="ports_or_all")

    assert Settings() == (8080, (1, 2), EVERYTHING)
    rows = declarations(Settings)
    assert [(r.dest, r.field, r.default, r.option_names) for r in rows.values() if isinstance(r, FlagSpec)] == [
        ("listen_port", "listen_port", "8080", ("-l", "--listen-port")),
        ("peer", "peers", "1,2", ("--peer-ids",)),
        ("everything", "everything", "*", ("--all",))]


def test_clean_takes_the_rows_marked_for_it() -> None:
    from istio_init.cli import clean_command

    names = {name for param in clean_command.params for name in param.opts}
    assert names == {name for spec in FLAGS if spec.for_clean for name in spec.option_names}


def test_both_front_doors_read_the_rows_option_names() -> None:
    """click's options and entry.py's words are the rows' option_names (one grammar, derived once)."""
    from istio_init.cli import run_command

    click_names = {name: param.name for param in run_command.params for name in param.opts}
    words = option_words()
    assert {name: spec.dest for name, spec in words.items()} == \
        {name: dest for name, dest in click_names.items() if name != "--cleanup-only"}


def test_every_rows_default_passes_the_character_checks() -> None:
    """from_sources checks only values that did not come from a row's default: each default must pass the checks."""
    from istio_init.config import _RowParser

    parser = _RowParser({spec.dest: spec.default for spec in FLAGS}, {})
    for spec in FLAGS:
        parser.check_characters(spec)


def test_each_rows_parser_returns_its_fields_type() -> None:
    """The row names its parser as text: its return annotation must be the field's own (both are strings here)."""
    from istio_init.config import _RowParser

    for spec in FLAGS:
        returns = getattr(_RowParser, spec.parser).__annotations__["return"]
        if spec.field:
            assert returns == Config.__annotations__[spec.field], spec.dest
        else:
            assert spec.no_effect or returns == "None", spec.dest
