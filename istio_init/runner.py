"""What one run of istio-init does, in order, once the Config is valid.

Kept apart from the CLI so the sequence (enter the namespace, decide the IP
family, plan, then print or apply) reads in one place and so the dry run path
imports nothing it does not use.
"""

from __future__ import annotations

import os
import sys

from istio_init.config import CURRENT_ONLY_FIELDS, ONLY_1_8_FIELDS, RULES_CURRENT, Config
from istio_init.model import RulePlan
from istio_init.rulesets import plan, resolvers_needed
from istio_init.render import render_plan


def summary(config: Config, ipv6: bool) -> str:
    """The effective configuration, for stderr, as Istio prints its variables."""
    lines = ["istio-init effective configuration:"]
    other = ONLY_1_8_FIELDS if config.rules_version == RULES_CURRENT else CURRENT_ONLY_FIELDS
    for name in config._fields:
        if name != "sources" and name not in other:
            value = getattr(config, name)
            lines.append(f"  {name}: {'*' if name == 'owner_groups_include' and value is None else _show(value)}")
    lines.append(f"  ip families: {'IPv4, IPv6' if ipv6 else 'IPv4'}")
    return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    return "(auto)" if value is None else str(value)


def decide_ipv6(config: Config) -> bool:
    if config.ipv6 is not None:
        return config.ipv6
    from istio_init import netns

    try:
        if config.rules_version != RULES_CURRENT:
            return netns.detect_ipv6()
        addresses = netns.pod_addresses()
        if not addresses:
            # Current Istio exits 1 here; RULES-CURRENT.md keeps RULES.md's IPv4 rules, and says so.
            from istio_init import logs

            logs.emit("warn", "istio-init: warning: the pod has no address but loopback and link-local ones; "
                              "making IPv4 rules only")
            return False
        if config.dual_stack:  # any IPv6 address of the pod
            return any(address.version == 6 for address in addresses)
        return addresses[0].version == 6
    except OSError as exc:
        print(f"istio-init: cannot read the pod's addresses ({exc}); making IPv4 rules only",
              file=sys.stderr)
        return False


def build_plan(config: Config) -> tuple[RulePlan, bool]:
    if config.network_namespace:
        from istio_init import netns

        netns.enter(config.network_namespace)
    ipv6 = decide_ipv6(config)
    return plan(config, ipv6, pod_resolvers(config)), ipv6


def pod_resolvers(config: Config) -> list[str]:
    """The pod's nameservers when the plan needs them; none: DNS is not captured, with a warning."""
    if not resolvers_needed(config):
        return []
    from istio_init import logs, resolvconf

    servers, problem = resolvconf.read()
    if problem:
        logs.emit("warn", f"istio-init: warning: DNS capture is on but {problem}; DNS is not captured "
                          "(--capture-all-dns captures every port-53 query)")
    return servers


def run(config: Config) -> None:
    rule_plan, ipv6 = build_plan(config)
    applying = not (config.dry_run or config.skip_rule_apply)
    if applying:
        from istio_init.apply import require_net_admin

        require_net_admin()  # before anything is logged: the pod's log then says just this
    # Like Istio, every run logs what it was asked to do: the first thing to
    # read in `kubectl logs POD -c istio-init` when a pod's traffic looks wrong.
    print(summary(config, ipv6), file=sys.stderr, flush=True)
    if config.native_nftables:
        from istio_init import nft_apply

        return nft_apply.run(config, rule_plan, ipv6)
    if config.dry_run:
        sys.stdout.write(render_plan(rule_plan))
        sys.stdout.flush()
        return
    from istio_init import apply

    if config.cni_mode and config.network_namespace:
        # Run from the host for one pod: lock that pod's tables only, as Istio's CNI mode does.
        os.environ["XTABLES_LOCKFILE"] = config.network_namespace
    apply.run(config, rule_plan)  # does nothing with --skip-rule-apply
    if config.run_validation:
        from istio_init import validation

        validation.run(config, ipv6)


def clean(config: Config) -> None:
    if config.network_namespace:
        from istio_init import netns

        netns.enter(config.network_namespace)
    if config.native_nftables:
        from istio_init import nft_apply

        return nft_apply.clean(config)
    from istio_init import apply

    apply.clean(config, dry_run=config.dry_run)
