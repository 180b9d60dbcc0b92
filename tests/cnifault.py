"""Runs istio-init-cni with a fault injected through the CLI's backend wrapper (tests only).

`python tests/cnifault.py FAULT` is `istio-init-cni` (the CNI protocol on stdin,
stdout and the environment) except that the backend a run chooses fails as
tests/faultinject.py describes, so the plugin's error path meets the real
rollback.
"""

from __future__ import annotations

import sys

from faultinject import wrapper
from istio_init import cli

if __name__ == "__main__":
    cli.cni_main(wrap_backend=wrapper(sys.argv[1]))
