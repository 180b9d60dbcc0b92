"""The rule sets istio-init can install, side by side, and the one place that picks one.

Each rule set is a module that reads like its spec (`istio_1_8`: RULES.md,
`current`: RULES-CURRENT.md) and exports `NAME`, `OWNED_CHAINS` (table -> the
chains it may create: only those are ever istio-init's) and
`plan(config, ipv6) -> RulePlan` (pure). The current rule set also takes the
pod's DNS resolvers, which the caller reads (`resolvers_needed` says when).
"""

from __future__ import annotations

from istio_init.config import Config
from istio_init.model import RulePlan
from istio_init.records import TYPE_CHECKING
from istio_init.rulesets import current, istio_1_8

if TYPE_CHECKING:
    from types import ModuleType
    from typing import Sequence

RULE_SETS: dict[str, ModuleType] = {istio_1_8.NAME: istio_1_8, current.NAME: current}
DEFAULT = istio_1_8.NAME


def ruleset_for(config: Config) -> ModuleType:
    return RULE_SETS[getattr(config, "rules_version", DEFAULT)]


def resolvers_needed(config: Config) -> bool:
    """Whether the plan depends on the pod's resolv.conf (current rule set, DNS capture, not capture-all)."""
    return ruleset_for(config) is current and config.dns_capture and not config.capture_all_dns


def plan(config: Config, ipv6: bool, resolvers: Sequence[str] = ()) -> RulePlan:
    """The plan of the rule set `config` asks for; `resolvers` only matter to the current one."""
    result: RulePlan = ruleset_for(config).plan(config, ipv6, resolvers)
    return result


def owned_chains(table: str) -> frozenset[str]:
    """The chains of `table` that any rule set can create: the only user chains istio-init touches."""
    return frozenset(c for module in RULE_SETS.values() for c in module.OWNED_CHAINS.get(table, ()))
