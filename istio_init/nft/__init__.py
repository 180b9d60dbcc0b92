"""The native nftables dialect: `write` is a plan as one `nft -f` transaction, `read` the kernel's JSON of it.

The kernel lists our tables as JSON (`nft -j list ruleset`); `read` maps that
back onto the plan's model, one IP family at a time, so that `trace` and
`graph` reason about native tables as they do about iptables. The two are kept
each other's inverse for every rule a rule set can plan
(tests/test_nft_roundtrip.py loads generated plans into a namespace's kernel
and reads them back).
"""
