"""istio-init: Istio's istio-iptables init container, re-implemented in Python.

The package is layered so that the common path stays cheap to start: flags and
environment -> `config.Config` -> `rulesets.plan()` (pure data) -> the dialects'
writers `iptables_save.write` and `nft.write` (text) and `backends`, which decide changes and have the `System`
(`system.py`: tools, libiptc, libnftables, netlink, routes, the lock) make them.
CONTRIBUTING.md draws the layout.
"""

__version__ = "0.1.0"
