"""The rule sets istio-init can install, side by side, and the one place that picks one.

Each rule set reads like its spec or its Istio release (`istio_1_8`:
docs/rules-1.8.md; `current`: docs/rules-current.md; `istio_1_9_to_1_24`: one
object per generation of Istio 1.9 to 1.24, after each release's run.go) and
exports `NAME`, `OWNED_CHAINS` (table -> the chains it may create: only those
are ever istio-init's) and `plan(config, ipv6, resolvers) -> RulePlan` (pure).
All but 1.8's also take the pod's DNS resolvers, which the caller reads
(`resolvers_needed` says when)."""

from __future__ import annotations

from istio_init.config import RULE_SET_RELEASES, RULES_CURRENT, Config
from istio_init.model import RulePlan
from istio_init.records import TYPE_CHECKING
from istio_init.rulesets import istio_1_8

if TYPE_CHECKING:
    from typing import Any, Iterator, Sequence


class _RuleSets:
    """Each rule set by its --rules-version name (a read-only mapping): a module, or one
    generation of Istio 1.9-1.24.

    The generations' module (and the current rule set's) is imported when one of
    them is asked for: a run of the 1.8 or the current rule set that needs no other
    does not load it.
    """

    def __getitem__(self, name: str) -> Any:
        if name == istio_1_8.NAME:
            return istio_1_8
        if name == RULES_CURRENT:  # imported when asked for, as the generations below
            from istio_init.rulesets import current

            return current
        if name not in RULE_SET_RELEASES:
            raise KeyError(name)
        from istio_init.rulesets import istio_1_9_to_1_24

        return istio_1_9_to_1_24.BY_NAME[name]

    def __contains__(self, name: object) -> bool:
        return name in RULE_SET_RELEASES

    def __iter__(self) -> Iterator[str]:
        return iter(RULE_SET_RELEASES)

    def __len__(self) -> int:
        return len(RULE_SET_RELEASES)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self[name]) for name in RULE_SET_RELEASES]

    def values(self) -> list[Any]:
        return [self[name] for name in RULE_SET_RELEASES]


RULE_SETS = _RuleSets()
DEFAULT = istio_1_8.NAME
_OWNED: dict[str, frozenset[str]] = {}


def ruleset_for(config: Config) -> Any:
    return RULE_SETS[getattr(config, "rules_version", DEFAULT)]


def resolvers_needed(config: Config) -> bool:
    """Whether the plan depends on the pod's resolv.conf (Istio 1.9 on, DNS capture, not capture-all)."""
    return ruleset_for(config) is not istio_1_8 and config.dns_capture and not config.capture_all_dns


def plan(config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
    """The plan of the rule set `config` asks for; `resolvers` matter to all but 1.8's."""
    result: RulePlan = ruleset_for(config).plan(config, ipv6, resolvers)
    return result


# The union of every rule set's OWNED_CHAINS, per table. Deriving it imports all ten rule sets
# (the generations' module alone costs about 0.5 ms), and every `check` and every re-run asks
# whose chains it sees; so the union is spelled here too, and tests/test_ownership.py holds it
# to the rule sets' own tables (owned_by_every_rule_set).
OWNED_BY_ANY_RULE_SET: dict[str, frozenset[str]] = {
    "nat": frozenset({"ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS", "ISTIO_REDIRECT"}),
    "mangle": frozenset({"ISTIO_INBOUND", "ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_DROP"}),
    "raw": frozenset({"ISTIO_INBOUND", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"}),
}


def owned_chains(table: str) -> frozenset[str]:
    """The chains of `table` that any rule set can create: the only user chains istio-init touches."""
    return OWNED_BY_ANY_RULE_SET.get(table, frozenset())


def owned_by_every_rule_set(table: str) -> frozenset[str]:
    """owned_chains derived from the rule sets themselves (all of them imported): the test's side."""
    if table not in _OWNED:
        _OWNED[table] = frozenset(c for module in RULE_SETS.values() for c in module.OWNED_CHAINS.get(table, ()))
    return _OWNED[table]
