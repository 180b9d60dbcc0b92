"""Loading libnftables' Python binding (Debian's python3-nftables) for `--native-nftables`.

The System (system.py) hands out the context this makes; the nftables backend
drives it. Loaded only when a run uses native nftables.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from istio_init.errors import ApplyError

DEBIAN_MODULE = "/usr/lib/python3/dist-packages/nftables/__init__.py"


def _module() -> ModuleType:
    """python3-nftables: the interpreter's own if it has one, else Debian's by path.

    istio-init usually runs in a virtualenv that does not see Debian's
    dist-packages; the binding is one pure-Python package, so loading that one
    file is safer than putting all of dist-packages on sys.path.
    """
    if "nftables" in sys.modules:
        return sys.modules["nftables"]
    try:
        import nftables  # type: ignore[import-not-found]

        module: ModuleType = nftables
        return module
    except ImportError:
        pass
    if not os.path.exists(DEBIAN_MODULE):
        raise ApplyError("--native-nftables needs libnftables and its Python binding: install Debian's "
                         "nftables and python3-nftables (scripts/setup does)")
    spec = importlib.util.spec_from_file_location("nftables", DEBIAN_MODULE,
                                                  submodule_search_locations=[os.path.dirname(DEBIAN_MODULE)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module
    spec.loader.exec_module(module)
    return module


def libnftables() -> Any:
    """A libnftables context (python3-nftables' `Nftables`); ApplyError when it cannot be loaded."""
    try:
        return _module().Nftables()
    except OSError as exc:  # libnftables.so.1 missing
        raise ApplyError(f"--native-nftables: cannot load libnftables: {exc}") from None
