"""The host layer: what istio-init asks of and changes in a network namespace besides the rule stores.

`netlink.py` is the one netlink stack, spoken by `addresses.py` (the pod's
addresses and `::6` on lo), `routing.py` (TPROXY's policy rule and route) and
`nft_tables.py` (which nf_tables tables exist); `namespace.py` enters a
namespace and says whose it is; `locks.py` holds the lock files. The System
(istio_init/system.py) is the way in for everything these change or read;
other modules take only routing.py's data types and lock files directly (the
CNI paths retire a namespace's lock, libiptc takes the xtables lock). The rule
stores themselves are the backends'.
"""
