"""The failures istio-init reports as one line, and how a rollback's outcome is worded.

A `ConfigError` is the user's mistake: the CLI prints its one-line message and
exits 2 before anything is touched. An `ApplyError` is the kernel refusing
something; its message names the table, chain and rule, and by the time it
reaches the CLI everything was put back, and `rollback_outcome` said so (or
said what could not be). A `ValidationError` is `--run-validation`'s exit 126;
a `TraceError` a connection or rule `trace` cannot evaluate. `check`, `graph` and
the CNI agent's pod lookup have theirs (`CheckError`, `GraphError`,
`PodLookupError`); a CNI caller gets a `CniError` as the specification's error
object, and a pod annotation istio-init cannot use is an `AnnotationError`.
Signals a module raises and catches itself (a rule text the model cannot hold,
a tool's deadline) stay beside their code.
"""

from __future__ import annotations

from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Sequence


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


class CheckError(IstioInitError):
    """The live state could not be read; neither "in sync" nor "drifted" can be said."""

    exit_code = 3


class GraphError(IstioInitError):
    """The picture cannot be made (no Graphviz for SVG, or dot refused the text)."""

    exit_code = 2


class PodLookupError(IstioInitError):
    """The API server did not give the pod (after the retries): the message says what it answered."""


class CniError(Exception):
    """A failure reported as the specification's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class AnnotationError(Exception):
    """A pod fact the decision cannot use: the message names the annotation (or key) and value."""


def rollback_outcome(error: BaseException, problems: Sequence[str], changed: bool = True) -> ApplyError:
    """The one line for a failed change once its rollback ran: what failed, then what became of the rest.

    `problems` are what the rollback could not put back; `changed` is False when the
    failure came before anything changed (then nothing needed putting back). An
    unexpected exception is named by its type, so even a bug reads as one line.
    """
    message = str(error) if isinstance(error, ApplyError) else f"{type(error).__name__}: {error}"
    if problems:
        return ApplyError(f"{message}; rollback incomplete: {'; '.join(problems)}")
    if changed:
        return ApplyError(f"{message} (everything changed in this run was put back)")
    return ApplyError(f"{message} (nothing had been changed)")
