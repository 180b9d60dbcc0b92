"""Backend details: restore error messages, the xtables lock, libiptc rule building."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest

from clirun import clean_environ
from istio_init.backends.iptables.restore import _reason, describe_line
from nsutil import Namespace

RESTORE_TEXT = """*nat
:ISTIO_OUTPUT - [0:0]
-A ISTIO_OUTPUT -j RETURN
COMMIT
*mangle
:ISTIO_DIVERT - [0:0]
-A OUTPUT -j NO_SUCH
COMMIT
"""


def test_failed_line_names_table_chain_and_rule() -> None:
    assert describe_line(RESTORE_TEXT, 7) == "table mangle, chain OUTPUT, rule `-A OUTPUT -j NO_SUCH`"
    assert describe_line(RESTORE_TEXT, 2) == "table nat, `:ISTIO_OUTPUT - [0:0]`"


def test_nft_refusal_at_commit_is_traced_to_the_rule_it_names() -> None:
    error = "iptables-nft-restore v1.8.9 (nf_tables): Chain 'NO_SUCH' does not exist\nError occurred at line: 8\n"
    assert describe_line(RESTORE_TEXT, 8, error) == "table mangle, chain OUTPUT, rule `-A OUTPUT -j NO_SUCH`"
    assert _reason(error) == "Chain 'NO_SUCH' does not exist"


@pytest.mark.root
def test_libiptc_waits_for_the_xtables_lock(netns: Namespace, tmp_path) -> None:
    """python-iptables takes no lock itself; the backend holds $XTABLES_LOCKFILE like `iptables -w`."""
    lock = tmp_path / "xtables.lock"
    env = clean_environ({"XTABLES_LOCKFILE": str(lock)})
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m", "istio_init", "-i", "*",
                                 "--ipv6", "false", "--iptables-backend", "libiptc"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        assert "ISTIO" not in netns.save()
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in netns.save()
