"""Which rules in built-in chains istio-init makes: derived from the rule sets, never restated.

A re-run or `clean` must remove istio-init's rules and nothing else. In the
chains a rule set owns that is everything; in built-in chains (PREROUTING,
OUTPUT, ...) it is the jumps to owned chains plus the few rules a rule set
writes there directly (`-i IF -j RETURN` for -k, DNS's DNAT or its REDIRECT to a resolver, TPROXY's MARK).
Those shapes are found by running each rule set's own planner on configs
whose variable parts (interfaces, ids, marks, resolvers) are sentinels (sentinels.py), so a value the
planner hard-codes (port 53, 15053, 127.0.0.1) is matched exactly and a
variable part matches any value. A user's rule that merely resembles one
(`-i cni0 -p tcp -j RETURN`) is not ours.
"""

from __future__ import annotations

import functools

from istio_init.model import Rule, is_builtin

from istio_init.rulesets.sentinels import SENTINEL_WORDS

__all__ = ["SENTINEL_WORDS", "builtin_rules"]


@functools.lru_cache(maxsize=2)
def builtin_rules(rule_sets: tuple[str, ...] | None = None) -> dict[tuple[str, str], tuple[Rule, ...]]:
    """(table, built-in chain) -> the rules the rule sets (None: all) write there that jump to no owned chain."""
    from istio_init.rulesets import RULE_SETS, owned_chains

    found: dict[tuple[str, str], dict[Rule, None]] = {}
    owned = {table: owned_chains(table) for table in ("nat", "mangle", "raw", "filter", "security")}
    for name, module in RULE_SETS.items():
        if rule_sets is not None and name not in rule_sets:
            continue
        for config in module.shape_configs():
            for ipv6 in (False, True):
                for family in module.plan(config, ipv6, getattr(module, "SHAPE_RESOLVERS", ())).families():
                    for step in family.steps:
                        rule = step.rule
                        if is_builtin(rule.table, rule.chain) and rule.target not in owned.get(rule.table, ()):
                            found.setdefault((rule.table, rule.chain), {})[rule] = None
    return {key: tuple(rules) for key, rules in found.items()}
