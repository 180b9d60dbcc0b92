"""Runs istio-init-cni on a host that fails at a named step (tests only).

`python tests/cnifault.py FAULT` is `istio-init-cni` (the CNI protocol on stdin,
stdout and the environment) except that the System below the backends fails
as tests/faultinject.py describes, so the plugin's error path meets the real
rollback.
"""

from __future__ import annotations

import sys

from faultinject import FaultySystem
from istio_init import cli, system

if __name__ == "__main__":
    with system.using(FaultySystem(sys.argv[1])):
        cli.cni_main()
