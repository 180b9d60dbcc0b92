"""The two kinds of failure istio-init reports.

A `ConfigError` is the user's mistake: the CLI prints its one-line message and
exits 2 before anything is touched. An `ApplyError` is the kernel refusing
something; its message names the table, chain and rule, and by the time it
reaches the CLI the backend has already put everything back.
"""


class IstioInitError(Exception):
    """Base class: every error istio-init expects to report without a traceback."""

    exit_code = 1


class ConfigError(IstioInitError):
    """A flag or environment variable holds a value istio-init will not use."""

    exit_code = 2

    def __init__(self, flag: str, value: str, reason: str) -> None:
        self.flag = flag
        self.value = value
        self.reason = reason
        super().__init__(f"invalid value for {flag}: {value!r}: {reason}")


class ApplyError(IstioInitError):
    """The kernel (or a restore command) refused part of the plan."""

    exit_code = 1


class ValidationError(IstioInitError):
    """--run-validation found that outbound traffic is not redirected (Istio's exit 126)."""

    exit_code = 126


class TraceError(IstioInitError):
    """The rules (or the connection) cannot be evaluated; names the rule."""

    exit_code = 2
