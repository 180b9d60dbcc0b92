"""istio-init: Istio's istio-iptables init container, re-implemented in Python.

The package is layered so that the common path stays cheap to start: flags and
environment -> `config.Config` -> `plan.plan()` (pure data) -> `render` (text)
and `backends` (the only modules that touch the kernel, together with `netns`).
"""

__version__ = "0.1.0"
