"""What one run of istio-init does, in order, once the Config is valid.

Kept apart from the CLI so the sequence (enter the namespace, decide the IP
family, plan, then render or apply) reads in one place and so the dry run
path imports nothing it does not use. Nothing here prints: progress goes to
the `log` callable the CLI passes in (stderr), and what belongs on stdout is
returned.
"""

from __future__ import annotations

import os
from _operator import attrgetter  # operator.py only re-exports the C module's

from istio_init import timing
from istio_init.config import RULES_CURRENT, AllOrList, Cidr, Config, fields_not_in, flag_label
from istio_init.errors import ApplyError
from istio_init.model import RulePlan
from istio_init.records import TYPE_CHECKING
from istio_init.iptables_save.write import render_plan
from istio_init.rulesets import plan, resolvers_needed

if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

    from istio_init.backends.base import Backend
    from istio_init.backends.iptables.backend import IptablesBackend
    from istio_init.system import System

    # log(message) or log(message, level): the CLI's stderr ("info" unless told, "warn", "error").
    Log = Callable[..., None]


def summary(config: Config, ipv6: bool) -> str:
    """The effective configuration, for stderr, as Istio prints its variables."""
    lines = ["istio-init effective configuration:"]
    other = fields_not_in(config.rules_version)
    for name in config._fields:
        if name != "sources" and name not in other:
            value = getattr(config, name)
            lines.append(f"  {name}: {_show(value)}")
    lines.append(f"  ip families: {'IPv4, IPv6' if ipv6 else 'IPv4'}")
    return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, AllOrList):  # '*' or the list
        return str(value) if value.all else _show(value.items)
    if isinstance(value, tuple):
        if value and isinstance(value[0], Cidr):  # thousands of them: no Python-level __str__ call each
            return ",".join(map(attrgetter("text"), value))
        return ",".join(map(str, value)) or "(empty)"
    return "(auto)" if value is None else str(value)


def current() -> System:
    """The System (system.py), imported when a step needs the kernel: a dry run never does."""
    from istio_init.system import current as system

    return system()


def enter_namespace(config: Config) -> None:
    """The one place a command moves into --network-namespace."""
    if config.network_namespace:
        current().enter_namespace(config.network_namespace, flag_label("network_namespace", config.sources))


def decide_ipv6(config: Config, log: Log) -> bool:
    if config.ipv6 is not None:
        return config.ipv6
    system = current()
    try:
        dual_stack = config.dual_stack or config.agent_dual_stack
        if config.rules_version != RULES_CURRENT and not dual_stack:
            return system.detect_ipv6()
        addresses = system.pod_addresses()
        if not addresses:
            # Current Istio exits 1 here; docs/rules-current.md keeps the 1.8 rule set's IPv4 rules, and says so.
            log("warning: the pod has no address but loopback and link-local ones; making IPv4 rules only",
                "warn")
            return False
        if dual_stack:  # any IPv6 address of the pod
            return any(address.version == 6 for address in addresses)
        return addresses[0].version == 6
    except OSError as exc:
        log(f"cannot read the pod's addresses ({exc}); making IPv4 rules only")
        return False


def build_plan(config: Config, log: Log) -> tuple[RulePlan, bool]:
    ipv6 = decide_ipv6(config, log)
    timing.mark("the pod's IP families")
    rule_plan = plan(config, ipv6, pod_resolvers(config, log))
    timing.mark("plan")
    return rule_plan, ipv6


def pod_resolvers(config: Config, log: Log) -> list[str]:
    """The pod's nameservers when the plan needs them; none: DNS is not captured, with a warning."""
    if not resolvers_needed(config):
        return []
    from istio_init import resolvconf

    servers, problem = resolvconf.read()
    if problem:
        log(f"warning: DNS capture is on but {problem}; DNS is not captured "
            "(--capture-all-dns captures every port-53 query)", "warn")
    return servers


def require_net_admin() -> None:
    """Fail before touching anything when the kernel would refuse every change.

    Without CAP_NET_ADMIN each backend fails in its own way (python-iptables
    deep in a table handle, the restore tool at line 1, the rollback after
    it); one line that says what is missing is what a pod's log needs.
    """
    if current().has_net_admin() is False:
        raise ApplyError("needs CAP_NET_ADMIN (run as root with NET_ADMIN, as Istio's init container does; "
                         "-n prints the rules without privileges)")


def warn_if_host_namespace(log: Log) -> None:
    """A bare `istio-init` in a node's root shell captures the node's own traffic: say so, once."""
    if current().in_initial_namespace():
        log("warning: applying to the host's own network namespace (the one pid 1 is in), not a pod's: "
            "its traffic will be redirected to the sidecar ports; use --network-namespace, run inside "
            "`unshare -n`, or -n to only print the rules", "warn")


def run(config: Config, log: Log) -> str:
    """The whole run (dry run, apply, validation); returns what goes to stdout."""
    enter_namespace(config)
    rule_plan, ipv6 = build_plan(config, log)
    applying = not (config.dry_run or config.skip_rule_apply)
    if applying:
        require_net_admin()  # before anything is logged: the pod's log then says just this
        warn_if_host_namespace(log)
    # Like Istio, every run logs what it was asked to do: the first thing to
    # read in `kubectl logs POD -c istio-init` when a pod's traffic looks wrong.
    log(summary(config, ipv6))
    if config.dry_run:
        if config.native_nftables:
            from istio_init.backends.nftables import guard_single_family
            from istio_init.nft.write import render_transaction

            return render_transaction(rule_plan, guard_single_family(config.rules_version))
        text = render_plan(rule_plan)
        timing.mark("render the dry run")
        return text
    out = ""
    if config.skip_rule_apply:
        log("--skip-rule-apply: not applying any rules")
    else:
        if config.cni_mode and config.network_namespace:
            # Run from the host for one pod: lock that pod's tables only, as Istio's CNI mode does.
            os.environ["XTABLES_LOCKFILE"] = config.network_namespace
        out = apply_plan(config, rule_plan, log)
    if config.run_validation:
        from istio_init import validation

        for message in validation.probe_families(config, ipv6):
            log(f"validation passed: {message}")
    return out


def apply_plan(config: Config, rule_plan: RulePlan, log: Log) -> str:
    from istio_init import backends

    families = [family.family for family in rule_plan.families()]
    backend: Backend
    tools: IptablesBackend | None = None
    if config.native_nftables:
        name = "nftables"
        backend = backends.native(config.rules_version)
        log("native nftables: our tables are replaced in one transaction (--native-nftables)")
    else:
        choice = backends.choose(config.iptables_backend, families)
        # The restore tools start loading now: meanwhile the backend is imported, the lock taken and
        # the change decided.
        name, backend = choice.name, backends.get(choice.name, start=families)
        tools = backend
        log(f"iptables backend {choice.name} ({choice.reason})")
    from istio_init import apply

    timing.mark("choose the backend")
    try:
        applied = apply.install(rule_plan, backend, tproxy=(config.tproxy_mark, config.tproxy_route_table))
    finally:
        if tools is not None:
            tools.release()  # what a failure before the commit left started
    for note in applied.notes:
        log(note)
    if not applied.changed and not applied.notes:
        log(f"no change: the namespace already held exactly these rules ({name})")
    timing.mark("log the notes")
    return applied.dump


def clean(config: Config, log: Log) -> str:
    """`clean` / `--cleanup-only`: remove istio-init's rules from every flavour that may hold them."""
    from istio_init import apply, backends

    enter_namespace(config)
    require_net_admin()
    chosen: list[Backend] = []
    if not config.native_nftables or config.sources.get("iptables_backend", "default") != "default":
        chosen += [backends.get(name) for name in backends.candidates(config.iptables_backend, [4, 6])]
    if config.native_nftables or backends.native_nft_in_use():
        chosen.append(backends.native(config.rules_version))
    result = apply.clean(chosen, {config.tproxy_mark}, dry_run=config.dry_run,
                         tables=frozenset({config.tproxy_route_table}))
    if config.dry_run:
        return "".join(result.planned)
    log(f"clean: {'changed ' + str(len(result.changed)) + ' table(s) or route(s)' if result.changed else 'nothing to remove'}")
    return ""
