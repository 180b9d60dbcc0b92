"""What one run of istio-init does, in order, once the Config is valid.

Kept apart from the CLI so the sequence (enter the namespace, decide the IP
family, plan, then render or apply) reads in one place and so the dry run
path imports nothing it does not use. Nothing here prints: progress goes to
the `log` callable the CLI passes in (stderr), and what belongs on stdout is
returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from istio_init import timing
from istio_init.config import Config
from istio_init.errors import ApplyError
from istio_init.model import RulePlan
from istio_init.render import render_plan
from istio_init.rulesets import plan

if TYPE_CHECKING:
    from istio_init.backends.base import Backend

Log = Callable[[str], None]
# Lets a caller (a test) wrap the backend the run chose, e.g. to inject a fault.
WrapBackend = Callable[["Backend"], "Backend"]


def summary(config: Config, ipv6: bool) -> str:
    """The effective configuration, for stderr, as Istio prints its variables."""
    lines = ["istio-init effective configuration:"]
    for name in config._fields:
        if name != "sources":
            lines.append(f"  {name}: {_show(getattr(config, name))}")
    lines.append(f"  ip families: {'IPv4, IPv6' if ipv6 else 'IPv4'}")
    return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    return "(auto)" if value is None else str(value)


def enter_namespace(config: Config) -> None:
    """The one place a command moves into --network-namespace."""
    if config.network_namespace:
        from istio_init import netns

        netns.enter(config.network_namespace)


def decide_ipv6(config: Config, log: Log) -> bool:
    if config.ipv6 is not None:
        return config.ipv6
    from istio_init import netns

    try:
        return netns.detect_ipv6()
    except OSError as exc:
        log(f"cannot read the pod's addresses ({exc}); making IPv4 rules only")
        return False


def build_plan(config: Config, log: Log) -> tuple[RulePlan, bool]:
    ipv6 = decide_ipv6(config, log)
    timing.mark("the pod's IP families")
    rule_plan = plan(config, ipv6)
    timing.mark("plan")
    return rule_plan, ipv6


def require_net_admin() -> None:
    """Fail before touching anything when the kernel would refuse every change.

    Without CAP_NET_ADMIN each backend fails in its own way (python-iptables
    deep in a table handle, the restore tool at line 1, the rollback after
    it); one line that says what is missing is what a pod's log needs.
    """
    from istio_init import netns

    if netns.has_net_admin() is False:
        raise ApplyError("needs CAP_NET_ADMIN (run as root with NET_ADMIN, as Istio's init container does; "
                         "-n prints the rules without privileges)")


def run(config: Config, log: Log, wrap: WrapBackend | None = None, network: Any = None) -> str:
    """The whole run (dry run, apply, validation); returns what goes to stdout."""
    enter_namespace(config)
    rule_plan, ipv6 = build_plan(config, log)
    applying = not (config.dry_run or config.skip_rule_apply)
    if applying:
        require_net_admin()  # before anything is logged: the pod's log then says just this
    # Like Istio, every run logs what it was asked to do: the first thing to
    # read in `kubectl logs POD -c istio-init` when a pod's traffic looks wrong.
    log(summary(config, ipv6))
    if config.dry_run:
        text = render_plan(rule_plan)
        timing.mark("render the dry run")
        return text
    out = ""
    if config.skip_rule_apply:
        log("--skip-rule-apply: not applying any rules")
    else:
        out = apply_plan(config, rule_plan, log, wrap, network)
    if config.run_validation:
        from istio_init import validation

        for message in validation.run(config, ipv6):
            log(f"validation passed: {message}")
    return out


def apply_plan(config: Config, rule_plan: RulePlan, log: Log, wrap: WrapBackend | None = None,
               network: Any = None) -> str:
    from istio_init import apply, backends

    families = [family.family for family in rule_plan.families()]
    choice = backends.choose(config.iptables_backend, families)
    log(f"iptables backend {choice.name} ({choice.reason})")
    backend = backends.get(choice.name)
    timing.mark("choose the backend")
    if wrap is not None:
        backend = wrap(backend)
    applied = apply.run(rule_plan, backend, lambda: backends.others_holding_ours(choice.name, [4, 6]), network)
    for note in applied.notes:
        log(note)
    timing.mark("log the notes")
    return applied.dump


def clean(config: Config, log: Log, wrap: WrapBackend | None = None) -> str:
    """`clean` / `--cleanup-only`: remove istio-init's rules from every flavour that may hold them."""
    from istio_init import apply, backends

    enter_namespace(config)
    require_net_admin()
    chosen: Sequence[Backend] = [backends.get(name) for name in backends.candidates(config.iptables_backend, [4, 6])]
    if wrap is not None:
        chosen = [wrap(b) for b in chosen]
    result = apply.clean(chosen, {config.tproxy_mark}, dry_run=config.dry_run)
    if config.dry_run:
        return "".join(result.planned)
    log(f"clean: {'changed ' + str(len(result.changed)) + ' table(s) or route(s)' if result.changed else 'nothing to remove'}")
    return ""
