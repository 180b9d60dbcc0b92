"""pilot-agent's logging flags, and the stderr they shape.

Current Istio runs the init container as `pilot-agent istio-iptables ...` and
its injection template always adds `--log_output_level=default:info` (and
`--log_as_json` when the mesh logs JSON). Those are pilot-agent's flags, not
istio-iptables', so they are taken out of the argument list here, before the
command line is parsed, and accepted with either rule set, as `--flag=value`
or `--flag value`.

What they change: the minimum level of the `default` scope (a `warn` or
`error` level hides istio-init's info lines) and, with `--log_as_json`, every
stderr line becomes one JSON object with `time`, `level` and `msg`, so a log
pipeline that parses pilot-agent's output parses ours. `--log_target`,
`--log_stacktrace_level` and `--log_caller` are accepted (validated, no
effect: istio-init has no stack traces or callers to print, and its log goes
to stderr, which is where a container runtime collects it).

Lines reach stderr as plain text from everywhere; they are info unless written
with `emit(level, ...)`. Keeping this in one stream wrapper means no other
module needs to know which format or level is in force.
"""

from __future__ import annotations

import sys

from istio_init.config import GO_SWITCH_WORDS, switch_value
from istio_init.errors import ConfigError
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import IO

LEVELS = ("debug", "info", "warn", "error", "fatal", "none")
DEFAULT_SCOPE = "default"
_VALUE_FLAGS = ("--log_output_level", "--log_target", "--log_stacktrace_level", "--log_caller")
_BOOL_FLAGS = ("--log_as_json",)


class LogOptions(NamedTuple):
    level: str = "info"  # minimum level of the default scope
    as_json: bool = False
    target: str = "stderr"
    stacktrace_level: str = "none"
    caller: str = ""
    given: tuple[str, ...] = ()  # which of the flags the command line had, in order


def _levels(flag: str, value: str) -> dict[str, str]:
    """`scope:level,...` (a bare level is the default scope's) as scope -> level."""
    scopes: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        scope, _, level = item.rpartition(":")
        level = level.strip().lower()
        if level not in LEVELS:
            raise ConfigError(flag, value, f"unknown level {level!r} (levels: {', '.join(LEVELS)})")
        scopes[scope.strip() or DEFAULT_SCOPE] = level
    return scopes


def _switch(flag: str, value: str) -> bool:
    on = switch_value(value, GO_SWITCH_WORDS)
    if on is None:
        raise ConfigError(flag, value, "must be true or false")
    return on


def split_args(argv: list[str]) -> tuple[list[str], LogOptions]:
    """(argv without pilot-agent's logging flags, the options they give)."""
    rest: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(name, "", "needs a value")
                i += 1
                value = argv[i]
            values[name] = value
        elif name in _BOOL_FLAGS:
            values[name] = value if eq else "true"
        else:
            rest.append(arg)
        i += 1
    options = LogOptions(given=tuple(values))
    if "--log_output_level" in values:
        scopes = _levels("--log_output_level", values["--log_output_level"])
        options = options._replace(level=scopes.get(DEFAULT_SCOPE, options.level))
    if "--log_stacktrace_level" in values:
        scopes = _levels("--log_stacktrace_level", values["--log_stacktrace_level"])
        options = options._replace(stacktrace_level=scopes.get(DEFAULT_SCOPE, options.stacktrace_level))
    if "--log_as_json" in values:
        options = options._replace(as_json=_switch("--log_as_json", values["--log_as_json"]))
    for flag in ("--log_target", "--log_caller"):
        if any(ch in values.get(flag, "") for ch in "\n\r\x00"):
            raise ConfigError(flag, values[flag], "control characters are not allowed")
    options = options._replace(target=values.get("--log_target", options.target),
                               caller=values.get("--log_caller", options.caller))
    return rest, options


class _LogStream:
    """A text stream in place of sys.stderr: level filter and, optionally, one JSON object a line."""

    def __init__(self, real: IO[str], options: LogOptions) -> None:
        self.real = real
        self.options = options
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:  # one split: a long text of many lines is not re-copied per line
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self.record("info", line)
        return len(text)

    def record(self, level: str, message: str) -> None:
        self.records(level, [message])

    def records(self, level: str, messages: list[str]) -> None:
        """Each message one record at `level`, all written at once: one write of a many-line summary, not one a line."""
        if LEVELS.index(level) < LEVELS.index(self.options.level) or self.options.level == "none":
            return
        if self.options.as_json:
            import datetime  # only for --log_as_json: every pod start would pay for them
            import json

            text = ""
            for message in messages:
                now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                text += json.dumps({"time": now, "level": level, "msg": message}) + "\n"
            self.real.write(text)
        else:
            self.real.write("\n".join(messages) + "\n")
        self.real.flush()

    def flush(self) -> None:
        if self.pending:
            line, self.pending = self.pending, ""
            self.record("info", line)
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()


def emit(level: str, message: str) -> None:
    """One line on stderr at `level` (plain print would make it info)."""
    emit_lines(level, [message])


def emit_lines(level: str, lines: list[str]) -> None:
    """Lines on stderr at `level`, one record each, written at once."""
    stream = sys.stderr
    if isinstance(stream, _LogStream):
        stream.flush()
        stream.records(level, lines)
    else:
        print("\n".join(lines), file=stream, flush=True)


class configured:
    """sys.stderr shaped by `options` for the duration of one command (a `with` block).

    A class rather than a contextlib.contextmanager: contextlib is one more
    import on every pod start. While it is active, ACTIVE holds its options
    (for the warning about flags the run's rule set's releases never wrote).
    """

    def __init__(self, options: LogOptions) -> None:
        self.options = options
        self.real: IO[str] = sys.stderr
        self.before = LogOptions()

    def __enter__(self) -> None:
        global ACTIVE
        self.real, self.before = sys.stderr, ACTIVE
        self.stream = _LogStream(self.real, self.options)
        sys.stderr, ACTIVE = self.stream, self.options

    def __exit__(self, *exc: object) -> None:
        global ACTIVE
        self.stream.flush()
        sys.stderr, ACTIVE = self.real, self.before


# The options of the command running now.
ACTIVE = LogOptions()
