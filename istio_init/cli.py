"""The `istio-init` command line (click), one of the two front doors that write output.

`istio-init [istio-iptables] FLAGS` is Istio's init container: the first word
of the seed's `args:` is accepted and ignored, and anything that is not a
subcommand name runs the default `run` command, so Istio's argument lists work
unchanged. Every user mistake becomes one line on stderr and exit code 2.
entry.py runs the plain flag list without click; both write through frontdoor.py,
and the rest of the package returns what to print and logs through `log`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, TypeVar

import click

from istio_init import frontdoor, logs, timing
from istio_init.config import (CLEANUP_ONLY_ENV, FLAGS, ISTIO_BINARY_NAME, Config, FlagSpec, switch_value,
                               take_switch_values)
from istio_init.errors import ConfigError, IstioInitError
from istio_init.frontdoor import PROG, log

DEFAULT_COMMAND = "run"
# Switches of the click commands that are not flag rows; `=true/false` works on them too.
_CLICK_SWITCHES = ("cleanup-only", "live", "json")


class _IstioGroup(click.Group):
    """A group whose default command is `run`, so Istio's flat flag lists keep working."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] == ISTIO_BINARY_NAME:
            args = args[1:]
        if not args or args[0] not in self.commands:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class _RunCommand(click.Command):
    """`run` is invoked without its name, so its usage line shows Istio's form."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(PROG, f"[{ISTIO_BINARY_NAME}] [OPTIONS]")
        formatter.write_usage(PROG, "COMMAND [OPTIONS]", prefix="       ")

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """`istio-init --help` is this command's help, so it is also where the other commands are found."""
        rows = [(f"{name} (default)" if name == DEFAULT_COMMAND else name, command.short_help or "")
                for name, command in cli.commands.items()]
        rows.append(("istio-init-cni", "The same capture as a chained CNI plugin, run by the container runtime."))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
        formatter.write_paragraph()
        formatter.write_text(f"'{PROG} COMMAND --help' explains one command; check, trace and graph take "
                             "the flags above.")


def _help(spec: FlagSpec) -> str:
    extra = f"[env {spec.env}" if spec.env else "["
    if not spec.is_switch:
        extra += f"{'; ' if spec.env else ''}default: {spec.default or 'empty'}"
    return f"{spec.help} {extra}]"


F = TypeVar("F", bound=Callable[..., Any])


def _options_for(wanted: Callable[[FlagSpec], bool] = lambda spec: True) -> Callable[[F], F]:
    """A decorator adding one click option per flag row (config.FLAGS) that is `wanted`.

    Its names are the row's `option_names`, the words entry.py reads through
    config.option_words: one grammar for both front doors.
    """
    def decorate(command: F) -> F:
        for spec in reversed([s for s in FLAGS if s.option_names and wanted(s)]):
            names = [*spec.option_names, spec.dest]
            kind: dict[str, Any] = {"is_flag": True} if spec.is_switch else {"metavar": "VALUE"}
            command = click.option(*names, default=None, help=_help(spec), **kind)(command)
        return command
    return decorate


_flag_options = _options_for()


def load_config(given: dict[str, Any]) -> Config:
    """Config from the parsed flags (None: not given) and the environment (frontdoor.load_config)."""
    timing.mark("click: parse the command line")
    ctx = click.get_current_context(silent=True)
    switch_values = ((ctx.find_root().obj or {}) if ctx else {}).get("switch_values", {})
    # As in entry.parse_run: a bare switch wins over its `=VALUE` spelling.
    config = frontdoor.load_config({**given, **{dest: value for dest, value in switch_values.items() if not given.get(dest)}})
    timing.mark("config: validate flags and environment")
    return config


_out = frontdoor.out


@click.group(cls=_IstioGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """istio-init: Istio's istio-iptables init container, in Python."""


@cli.command(DEFAULT_COMMAND, cls=_RunCommand, context_settings={"help_option_names": ["-h", "--help"]},
             short_help="Install the rules (-n: print them, change nothing).")
@_flag_options
@click.option("--cleanup-only", is_flag=True, default=False,
              help="Remove istio-init's rules, routes and addresses instead of applying. [env CLEANUP_ONLY]")
def run_command(cleanup_only: bool, **given: Any) -> None:
    """Install Istio's capture rules in this network namespace (-n: print them).

    `run` is the default command: `istio-init FLAGS`, `istio-init
    istio-iptables FLAGS` (Istio's init-container args) and `istio-init run
    FLAGS` are the same. Flags and environment variables are those of Istio's
    istio-iptables; a flag on the command line beats its environment variable.
    With -n the rules are printed in iptables-save form and nothing is changed.
    A re-run converges to exactly these flags' rules.
    """
    from istio_init import runner

    config = load_config(given)
    if cleanup_only or _cleanup_only_from_env():
        _out(runner.clean(config, log))
    else:
        _out(runner.run(config, log))


def _cleanup_only_from_env() -> bool:
    """Current Istio's CLEANUP_ONLY, with the flag table's spelling of true and false."""
    value = os.environ.get(CLEANUP_ONLY_ENV)
    if value is None:
        return False
    cleanup = switch_value(value)
    if cleanup is None:
        raise ConfigError(f"--cleanup-only (from {CLEANUP_ONLY_ENV})", value, "must be true or false")
    return cleanup


@cli.command("trace", context_settings={"help_option_names": ["-h", "--help"]},
             short_help="What the rules do with one connection, rule by rule.")
@_flag_options
@click.option("--direction", type=click.Choice(["in", "out"]), required=True,
              help="in: arriving at the pod; out: sent by a process in the pod.")
@click.option("--dst", required=True, help="Destination address.")
@click.option("--dport", type=int, required=True, help="Destination port.")
@click.option("--src", default=None, help="Source address (default: the pod's own, or loopback for loopback).")
@click.option("--uid", type=int, default=0, show_default=True, help="uid of the sending process (out).")
@click.option("--gid", type=int, default=0, show_default=True, help="gid of the sending process (out).")
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--in-interface", default=None, help="Interface an inbound packet arrives on (default eth0).")
@click.option("--out-interface", default=None, help="Interface an outbound packet leaves by (default: lo "
              "for local destinations, else eth0).")
@click.option("--live", is_flag=True, default=False,
              help="Walk the rules installed in the namespace (iptables-save) instead of the plan.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the trace as JSON.")
def trace_command(live: bool, as_json: bool, direction: str, dst: str, dport: int, src: str | None, uid: int,
                  gid: int, protocol: str, in_interface: str | None, out_interface: str | None,
                  **given: Any) -> None:
    """Explain what the rules do with one connection, rule by rule.

    Takes every flag of `run`; walks the rules those flags would install (or,
    with --live, the installed ones) as netfilter's mangle and nat hooks would.
    """
    from istio_init import runner, trace

    config = load_config(given)
    runner.enter_namespace(config)
    conn = {"direction": direction, "dst": dst, "dport": dport, "src": src, "uid": uid, "gid": gid,
            "protocol": protocol, "in_interface": in_interface, "out_interface": out_interface}
    resolvers = [] if live else runner.pod_resolvers(config, log)
    _out(trace.trace_connection(config, conn, live, as_json, resolvers) + "\n")


@cli.command("check", context_settings={"help_option_names": ["-h", "--help"]},
             short_help="Compare the installed rules with the flags' rules (exit 1: drift).")
@_flag_options
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the result as JSON.")
def check_command(as_json: bool, **given: Any) -> None:
    """Compare the installed rules with what the flags would install; change nothing.

    Takes every flag of `run`. Exit 0 and one line when in sync; exit 1 and
    the missing, extra and misordered rules, chains, TPROXY routing and ::6
    when not; exit 3 when the state cannot be read. Usable as an exec probe.
    """
    from istio_init import check, runner

    config = load_config(given)
    runner.enter_namespace(config)
    report = check.compare_installed(config, log)
    _out((check.to_json(report) if as_json else check.format_text(report)) + "\n")
    sys.exit(report.exit_code)


@cli.command("graph", context_settings={"help_option_names": ["-h", "--help"]},
             short_help="Draw the chains: Mermaid, DOT, SVG, text or JSON.")
@_flag_options
@click.option("--live", is_flag=True, default=False,
              help="Draw the rules installed in the namespace (iptables-save, or with --native-nftables "
                   "our nft tables) instead of the plan.")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot", "svg", "text", "json"]), default="mermaid",
              show_default=True, help="mermaid for Markdown, dot for Graphviz, svg through Graphviz's dot, "
                                      "text for a terminal, json for scripts.")
@click.option("--table", type=click.Choice(["nat", "mangle", "raw", "all"]), default="all", show_default=True)
def graph_command(live: bool, fmt: str, table: str, **given: Any) -> None:
    """Draw the chains as a directed graph: hooks and chains, jumps, outcomes.

    Takes every flag of `run`; draws the rules those flags would install (or,
    with --live, the installed ones). Each chain node lists its rules; each
    jump is an edge labelled with its rule number and match.
    """
    from istio_init import graph, runner

    config = load_config(given)
    runner.enter_namespace(config)
    _out(graph.draw(config, live, fmt, table, log))


@cli.command("clean", context_settings={"help_option_names": ["-h", "--help"]},
             short_help="Remove istio-init's rules, routes and ::6 address.")
@_options_for(lambda spec: spec.for_clean)
def clean_command(**given: Any) -> None:
    """Remove istio-init's rules, TPROXY routes and the ::6 address, in both families.

    Removes every ISTIO_ chain, every jump to one and the few rules istio-init
    puts in built-in chains; every other rule stays. Succeeds when there is
    nothing to remove. With -n, prints what would be removed.
    """
    from istio_init import runner

    _out(runner.clean(load_config(given), log))


def _agent_log(message: str, level: str = "info") -> None:
    """One entry of the agent's log (stderr: the DaemonSet container's log)."""
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} {level} {PROG} cni-agent[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _mesh_switch(label: str, value: str | None) -> str | None:
    from istio_init.podcapture import go_bool

    if value is not None and go_bool(value) is None:
        raise ConfigError(label, value, "must be true or false")
    return value


@cli.command("cni-agent", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plugin", required=True, metavar="PATH", help="The static host plugin to install "
              "(scripts/build-cni-plugin builds it; the image has it).")
@click.option("--cni-bin-dir", required=True, metavar="DIR", help="The node's CNI bin dir (e.g. /opt/cni/bin).")
@click.option("--cni-conf-dir", required=True, metavar="DIR", help="The node's CNI conf dir (e.g. /etc/cni/net.d).")
@click.option("--run-dir", required=True, metavar="DIR",
              help="Where the agent's socket lives; the same path on the node and in the agent's container.")
@click.option("--exclude-namespaces", default="kube-system", show_default=True, metavar="LIST",
              help="Comma list of namespaces whose pods are never captured (also passed when the agent is down).")
@click.option("--health-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port of /readyz (0: any free port).")
@click.option("--dns-capture", envvar="ISTIO_META_DNS_CAPTURE", default=None, metavar="BOOL",
              help="Mesh-wide: capture all DNS (a pod's proxyMetadata overrides). [env ISTIO_META_DNS_CAPTURE]")
@click.option("--invalid-drop", envvar="INVALID_DROP", default=None, metavar="BOOL",
              help="Mesh-wide: drop packets conntrack finds INVALID. [env INVALID_DROP]")
@click.option("--dual-stack", envvar="ISTIO_DUAL_STACK", default=None, metavar="BOOL",
              help="Mesh-wide: IPv6 rules when the pod has any IPv6 address. [env ISTIO_DUAL_STACK]")
@click.option("--kubeconfig", default=None, metavar="FILE",
              help="Read each pod from the API server (as Istio's plugin does: the istio-proxy container's "
                   "runAsUser/runAsGroup and env) instead of taking the runtime's annotations only.")
def cni_agent_command(plugin: str, cni_bin_dir: str, cni_conf_dir: str, run_dir: str, exclude_namespaces: str,
                      health_port: int, dns_capture: str | None, invalid_drop: str | None,
                      dual_stack: str | None, kubeconfig: str | None) -> None:
    """Run the CNI form's node agent: install the host plugin, chain it, and capture pods as they start.

    Each pod sandbox is decided from its own annotations, which the container
    runtime passes to the plugin; SIGTERM removes the plugin from the node.
    """
    from pathlib import Path

    from istio_init import cni_agent
    from istio_init.podcapture import DNS_CAPTURE, DUAL_STACK, INVALID_DROP, MeshSettings

    if not os.path.isfile(plugin):
        raise ConfigError("--plugin", plugin, "no such file")
    for label, value in (("--run-dir", run_dir), ("--cni-bin-dir", cni_bin_dir), ("--cni-conf-dir", cni_conf_dir)):
        if not os.path.isabs(value) or any(c in value for c in '"\\\n'):
            raise ConfigError(label, value, "must be an absolute path without quotes or backslashes")
    settings = {DNS_CAPTURE: _mesh_switch("--dns-capture", dns_capture),
                INVALID_DROP: _mesh_switch("--invalid-drop", invalid_drop),
                DUAL_STACK: _mesh_switch("--dual-stack", dual_stack)}
    mesh = MeshSettings(tuple(n.strip() for n in exclude_namespaces.split(",") if n.strip()),
                        {name: value for name, value in settings.items() if value is not None})
    options = cni_agent.AgentOptions(Path(plugin), Path(cni_bin_dir), Path(cni_conf_dir), Path(run_dir), mesh,
                                     health_port)
    if kubeconfig is not None:
        from dataclasses import replace

        from istio_init import kubeapi

        source = kubeapi.api_facts_source(kubeapi.load_kubeconfig(kubeconfig), mesh.exclude_namespaces)
        options = replace(options, pod_facts=source)
    sys.exit(cni_agent.Agent(options, _agent_log).serve())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: click errors and IstioInitError become one stderr line.

    pilot-agent's logging flags are taken out first (logs.py): they shape
    stderr for the whole run, whatever the command and rule set.
    """
    timing.mark("imports: click, config, the CLI's commands")
    frontdoor.prepare_stdout()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        args, log_options = logs.split_args(args)
        args, switch_values = take_switch_values(args, _CLICK_SWITCHES)
    except IstioInitError as exc:
        print(f"{PROG}: {frontdoor.one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    with logs.configured(log_options):
        code = _run(args, {"switch_values": switch_values})
        if timing.ENABLED:
            for line in timing.report():
                log(line)
    sys.exit(code)


def _run(args: list[str], obj: dict[str, Any]) -> int:
    """The command's exit code; every failure already reported as one line. `obj` is click's context object
    (the switch values taken out of the arguments)."""
    exit_code = 0

    def command() -> None:
        nonlocal exit_code
        try:
            cli.main(args=args, prog_name=PROG, standalone_mode=False, obj=obj)
        except click.exceptions.Exit as done:
            exit_code = done.exit_code
        except click.Abort:
            logs.emit("error", f"{PROG}: aborted")
            exit_code = 1
        except click.ClickException as exc:
            logs.emit("error", f"{PROG}: {exc.format_message()}")
            exit_code = exc.exit_code

    return frontdoor.guarded(command) or exit_code


# ---- istio-init-cni: the CNI plugin's process side (its logic is istio_init/cni.py) ----------

CNI_PROG = "istio-init-cni"


def cni_flags(argv: list[str]) -> dict[str, Any]:
    """The `run` command's options parsed from a conflist's "args" (click's errors propagate)."""
    if argv[:1] == [ISTIO_BINARY_NAME]:
        argv = argv[1:]
    with run_command.make_context(PROG, argv) as ctx:
        return dict(ctx.params)


def _cni_log(message: str, level: str = "info") -> None:
    """One entry in the plugin's log: fd 2, which is the configuration's logFile once it is read.

    Written straight to the descriptor and never raising: a log that cannot
    be written (a full disk, /dev/full) loses lines, not the answer.
    """
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    line = f"{stamp} {level} {CNI_PROG}[{os.getpid()}] {os.environ.get('CNI_CONTAINERID', '-')[:12]}: {message}\n"
    _write_all(2, line.encode("utf-8", "replace"))


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd`; False (nothing raised) when the descriptor refuses."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


def _cni_log_to(path: str) -> None:
    """Point fd 1 and 2 (so everything the apply and its tools print) at the log file."""
    from istio_init.cni import ERR_IO
    from istio_init.errors import CniError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise CniError(ERR_IO, f"cannot open the log file {path}", exc.strerror or str(exc)) from None
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _cni_descriptors() -> int:
    """Make fds 0-2 usable and keep a private copy of stdout for the answer; returns that copy.

    A runtime may start the plugin with a descriptor closed (`2>&-`). Then the
    next file opened would take its number, so the log could land in the
    answer: a closed 0, 1 or 2 is opened on /dev/null first. Then fd 1 points
    at fd 2, so nothing the apply path or a tool it runs prints can reach the
    runtime.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    return answer_fd


def _cni_stdin() -> bytes:
    """The network configuration as bytes (decoded by cni.decode), read boundedly."""
    from istio_init.cni import MAX_INPUT_BYTES

    chunks, size = [], 0
    try:
        while size <= MAX_INPUT_BYTES:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        pass  # unreadable stdin: what was read (maybe nothing) is decoded, and refused
    return b"".join(chunks)


def cni_main() -> None:
    """Console-script entry of istio-init-cni; stdout and the exit status follow the CNI specification.

    stdout belongs to the protocol: `cni.answer` makes the one answer (already
    encoded, always valid JSON), it is written to the copy of fd 1 kept by
    _cni_descriptors, and the process ends at once, so no late flush of a log
    that cannot be written changes the exit status. Without CNI_COMMAND it
    prints what it is and the protocol versions it speaks, as the reference
    plugins do.
    """
    from istio_init import cni

    if not os.environ.get("CNI_COMMAND"):  # a person, not a runtime: say what this is (stdin is theirs)
        try:
            sys.stderr.write(cni.about())
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # no stderr to say it on
            pass
        os._exit(0)
    answer_fd = _cni_descriptors()
    sys.stdout = sys.stderr = open(1, "w", errors="replace", closefd=False)  # stray prints go to the log, never to the answer
    call = cni.Call(os.environ, _cni_log, cni_flags)
    code, answer = cni.answer(os.environ.get("CNI_COMMAND", ""), _cni_stdin(), call.log,
                              lambda data: cni.decide(call, data, _cni_log_to))
    if answer and not _write_all(answer_fd, answer):
        code = code or 1  # the runtime cannot have the result: it must not take the ADD as done
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
