"""What istio-init prints after an apply is what iptables-save then shows (root only).

The printed tables are derived from the snapshot and the committed changes
(backends/iptables/committed.py) instead of a second iptables-save, so they are
compared here, byte for byte with counters zeroed, with a real iptables-save
after applies through every backend: into fresh namespaces, on top of other
people's rules (user chains, a DROP policy), re-runs, and changed flags.
"""

from __future__ import annotations

import re
import sys

import pytest

from cases import SEED_ARGS, UNRELATED_V4, UNRELATED_V6
from clirun import clean_environ
from istio_init.iptables_save.read import table_blocks
from istio_init.iptables_save.write import split_families
from nsutil import Namespace

pytestmark = pytest.mark.root

BACKENDS = ("libiptc", "legacy", "nft")
FLAVOUR = {"libiptc": "legacy", "legacy": "legacy", "nft": "nft"}
RUNS = (
    [*SEED_ARGS, "--ipv6", "false"],
    [*SEED_ARGS, "--ipv6", "false"],  # the re-run: flush and re-add
    ["-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*", "-k", "eth1", "--redirect-dns", "--ipv6", "true"],
    ["-i", "10.0.0.0/8,fd00::/8", "-x", "10.96.0.0/12", "-b", "8080", "-q", "3306", "--ipv6", "true"],
    # Many rules of one shape (libiptc re-uses one built rule for them), inserts among them.
    ["-i", "10.0.0.0/8,192.0.2.0/24,fd00::/8,2001:db8::/48", "-k", "eth1,eth2",
     "-x", ",".join([f"198.51.100.{i}" for i in range(1, 60)] + [f"2001:db8:1::{i:x}/128" for i in range(1, 40)]),
     "--ipv6", "true"],
)


def _comparable(text: str) -> str:
    """No comments; counters zeroed (a packet may pass between the snapshot and the save)."""
    return "".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) + "\n" for line in text.splitlines()
                   if not line.startswith("#"))


def _tables(text: str) -> list[str]:
    return [line[1:] for line in text.splitlines() if line.startswith("*")]


@pytest.mark.parametrize("with_unrelated", [False, True], ids=["fresh", "unrelated-rules"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_printed_tables_equal_iptables_save(netns: Namespace, backend: str, with_unrelated: bool) -> None:
    flavour = FLAVOUR[backend]
    if with_unrelated:
        netns.run(f"iptables-{flavour}-restore", "--noflush", input=UNRELATED_V4)
        netns.run(f"ip6tables-{flavour}-restore", "--noflush", input=UNRELATED_V6)
    for number, args in enumerate(RUNS):
        done = netns.run(sys.executable, "-m", "istio_init", *args, "--iptables-backend", backend,
                         env=clean_environ())
        printed = dict(zip((4, 6), split_families(done.stdout)))
        assert _tables(printed[4]), done.stderr
        if RUNS[number - 1][:2] == ["-m", "TPROXY"]:  # REDIRECT after TPROXY: the emptied IPv4 mangle is printed
            assert "mangle" in _tables(printed[4]), done.stdout
        for family, text in printed.items():
            if not text:
                continue
            real = netns.save(f"{'ip6' if family == 6 else 'ip'}tables-{flavour}-save")
            assert _comparable(text) == _comparable(table_blocks(real, _tables(text))), (args, family)
