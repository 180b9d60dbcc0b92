"""The iptables backends (libiptc, and `iptables-restore` with the legacy or nft binaries).

They share one path (backend.py): snapshot with `iptables-save -c`, parse it
into the model (iptables_save/read.py), decide with a pure function (reconcile.py),
commit each table once, and restore the snapshot of what changed on failure.
"""
