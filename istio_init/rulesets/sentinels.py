"""Stand-in values for the variable parts of a rule (interfaces, ids, marks), used to find rule shapes.

See ownership.py: a rule set plans a config holding these, and wherever one
shows up in a rule's text, that part of the shape matches any value.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from istio_init.config import Config

SENTINEL_ID = 4000000123
SENTINEL_MARK = 0x7EAD0001
SENTINEL_IFACE = "sentinelif0"
SENTINEL_LOOPBACK_CIDR = "127.123.45.67/32"  # the current rule set's IPv4 loopback CIDR
# The pod's resolvers (Istio 1.9-1.22 match them in built-in chains): one per family.
SENTINEL_RESOLVERS = ("203.0.113.231", "2001:db8::e7")
# How the sentinels can appear in rule text: each one stands for "any value".
SENTINEL_WORDS = (str(SENTINEL_ID), f"{SENTINEL_MARK:#x}", str(SENTINEL_MARK), SENTINEL_IFACE,
                  SENTINEL_LOOPBACK_CIDR, f"{SENTINEL_RESOLVERS[0]}/32", f"{SENTINEL_RESOLVERS[1]}/128")


def shape_config(rule_set: str) -> Config:
    """A config reaching every rule `rule_set` writes into built-in chains, from the flag rows.

    Every flag the rule set has whose value can appear in such a rule
    (`FlagSpec.builtin`) gets its sentinel (a switch: on), and inbound and
    outbound capture are on, so its whole shape is planned. A flag added with
    `builtin=True` is covered here without another edit.
    """
    from istio_init.config import EVERYTHING, FLAGS, Config

    by_parser: dict[str, Any] = {"id_list": (SENTINEL_ID,), "interfaces": (SENTINEL_IFACE,), "uint32": SENTINEL_MARK,
                 "mode": "TPROXY", "switch": True, "dns": True, "loopback_cidr": SENTINEL_LOOPBACK_CIDR}
    values: dict[str, Any] = {spec.field: by_parser[spec.parser] for spec in FLAGS
                              if spec.builtin and spec.exists_in(rule_set)}
    return Config(rules_version=rule_set, inbound_ports=EVERYTHING, outbound_cidrs=EVERYTHING, **values)
