"""Stand-in values for the variable parts of a rule (interfaces, ids, marks), used to find rule shapes.

See ownership.py: a rule set plans a config holding these, and wherever one
shows up in a rule's text, that part of the shape matches any value.
"""

SENTINEL_ID = 4000000123
SENTINEL_MARK = 0x7EAD0001
SENTINEL_IFACE = "sentinelif0"
SENTINEL_LOOPBACK_CIDR = "127.123.45.67/32"  # the current rule set's IPv4 loopback CIDR
# The pod's resolvers (Istio 1.9-1.22 match them in built-in chains): one per family.
SENTINEL_RESOLVERS = ("203.0.113.231", "2001:db8::e7")
# How the sentinels can appear in rule text: each one stands for "any value".
SENTINEL_WORDS = (str(SENTINEL_ID), f"{SENTINEL_MARK:#x}", str(SENTINEL_MARK), SENTINEL_IFACE,
                  SENTINEL_LOOPBACK_CIDR, f"{SENTINEL_RESOLVERS[0]}/32", f"{SENTINEL_RESOLVERS[1]}/128")
