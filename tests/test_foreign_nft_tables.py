"""Only the nft tables a rule set plans are istio-init's (issue 19, finding 7).

A user's `inet istio-proxy-foo` made every iptables apply load libnftables
and log "removed istio-init's rules from the nftables tables", which was
untrue. Now such a table is neither read, reported nor touched, by apply and
by clean.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from clirun import clean_environ
from hostile import SEED, pod_namespace

FOREIGN = ("add table inet istio-proxy-foo\n"
           "add chain inet istio-proxy-foo pre { type filter hook prerouting priority 0; }\n"
           "add rule inet istio-proxy-foo pre tcp dport 9 counter accept\n")
# Runs the CLI in a child process and reports, after it, whether libnftables' binding was loaded.
_PROBE = ("import sys\nfrom istio_init.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
          "    code = e.code\nprint(f'exit={code} nftables_loaded={\"nftables\" in sys.modules}', file=sys.__stderr__)")


def _run(ns_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={ns_path}", sys.executable, "-c", _PROBE, *args], text=True,
                          capture_output=True, env=clean_environ(), timeout=60)


def _foreign(ns_path: str) -> str:
    return subprocess.run(["nsenter", f"--net={ns_path}", "nft", "list", "table", "inet", "istio-proxy-foo"],
                          text=True, capture_output=True, check=True).stdout


@pytest.mark.root
@pytest.mark.parametrize("backend", ["auto", "legacy", "nft", "libiptc"])
def test_a_foreign_istio_proxy_table_is_not_istio_inits(backend: str) -> None:
    ns = pod_namespace("fnft")
    try:
        subprocess.run(["nsenter", f"--net={ns.path}", "nft", "-f", "-"], input=FOREIGN, text=True, check=True)
        before = _foreign(ns.path)
        for args in ([*SEED, "--iptables-backend", backend], ["clean", "--iptables-backend", backend]):
            result = _run(ns.path, *args)
            assert "exit=0 nftables_loaded=False" in result.stderr, result.stderr
            assert "nftables tables" not in result.stderr, result.stderr
            assert _foreign(ns.path) == before
        # The planned tables are still found: a native apply, then an iptables run removes them.
        native = _run(ns.path, *SEED, "--native-nftables")
        assert "exit=0" in native.stderr, native.stderr
        switched = _run(ns.path, *SEED, "--iptables-backend", backend)
        assert "removed istio-init's rules from the nftables tables" in switched.stderr, switched.stderr
        assert _foreign(ns.path) == before
    finally:
        ns.remove()
