"""The rule sets istio-init can install, side by side, and the one place that picks one.

Each rule set is a module that reads like its spec (`istio_1_8`: RULES.md)
and exports `NAME`, `OWNED_CHAINS` (table -> the chains it may create: only
those are ever istio-init's) and `plan(config, ipv6) -> RulePlan` (pure).
"""

from __future__ import annotations

from types import ModuleType

from istio_init.config import Config
from istio_init.model import RulePlan
from istio_init.rulesets import istio_1_8

RULE_SETS: dict[str, ModuleType] = {istio_1_8.NAME: istio_1_8}
DEFAULT = istio_1_8.NAME


def ruleset_for(config: Config) -> ModuleType:
    return RULE_SETS[getattr(config, "rules_version", DEFAULT)]


def plan(config: Config, ipv6: bool) -> RulePlan:
    """The plan of the rule set `config` asks for."""
    result: RulePlan = ruleset_for(config).plan(config, ipv6)
    return result


def owned_chains(table: str) -> frozenset[str]:
    """The chains of `table` that any rule set can create: the only user chains istio-init touches."""
    return frozenset(c for module in RULE_SETS.values() for c in module.OWNED_CHAINS.get(table, ()))
