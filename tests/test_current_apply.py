"""Current Istio's injected init container, applied for real; re-runs, converging across rule sets, clean.

The argument lists are those of current Istio's injection template
(docs/rules-current.md, "How current Istio calls the init container"); the rule set
comes from ISTIO_INIT_RULES_VERSION, as in an image built for current Istio.
The expected rules are written out here from docs/rules-current.md's algorithm, not
taken from the planner.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

from cases import SEED_ARGS, UNRELATED_V4, UNRELATED_V6
from cases_current import CURRENT_CASES, INJECTED
from clirun import clean_environ
from istio_init.iptables_save.write import split_families
from istio_init.iptables_save.read import normalize
from nsutil import Namespace
from appliedns import routing

pytestmark = pytest.mark.root

IMAGE_ENV = {"ISTIO_INIT_RULES_VERSION": "current"}
RESOLVER = "198.51.100.53"

def _default_nat(family: int, dns: bool = False, extra_output_first: tuple[str, ...] | list[str] = (),
                 extra_output_last: tuple[str, ...] | list[str] = (), prerouting: tuple[str, ...] | list[str] = (),
                 output: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The nat table current Istio's default injected args make (steps 4-16), in iptables-save order."""
    loop, six = ("::1/128", "::6/128") if family == 6 else ("127.0.0.1/32", "127.0.0.6/32")
    uid_port = "-m multiport ! --dports 53,15008" if dns else "-m tcp ! --dport 15008"
    lo_return = "-o lo -p tcp -m tcp ! --dport 53 -m owner ! --{}-owner 1337 -j RETURN" if dns \
        else "-o lo -m owner ! --{}-owner 1337 -j RETURN"
    chains = ["ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", *(["ISTIO_OUTPUT_DNS"] if dns else []),
              "ISTIO_REDIRECT"]
    lines = ["*nat", *(f":{c} - [0:0]" for c in chains),
             *prerouting, "-A PREROUTING -p tcp -j ISTIO_INBOUND",
             *output, "-A OUTPUT -j ISTIO_OUTPUT",
             "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
             *(f"-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j RETURN" for p in (15090, 15021, 15020)),
             "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
             "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
             *extra_output_first,
             f"-A ISTIO_OUTPUT -s {six} -o lo -j RETURN",
             f"-A ISTIO_OUTPUT ! -d {loop} -o lo -p tcp {uid_port} -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
             "-A ISTIO_OUTPUT " + lo_return.format("uid"),
             "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
             f"-A ISTIO_OUTPUT ! -d {loop} -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 "
             "-j ISTIO_IN_REDIRECT",
             "-A ISTIO_OUTPUT " + lo_return.format("gid"),
             "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
             *(["-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS"] if dns else []),
             f"-A ISTIO_OUTPUT -d {loop} -j RETURN",
             *extra_output_last,
             "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"]
    if dns:
        lines += [f"-A ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p {proto} -m {proto} --dport 53 -j REDIRECT --to-ports 15053"
                  for proto in ("tcp", "udp")]
    return lines + ["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001", "COMMIT"]


DNS_RAW = ["*raw", ":ISTIO_INBOUND - [0:0]", ":ISTIO_OUTPUT_DNS - [0:0]",
           "-A PREROUTING -j ISTIO_INBOUND", "-A OUTPUT -j ISTIO_OUTPUT_DNS",
           f"-A ISTIO_INBOUND -s {RESOLVER}/32 -p udp -m udp --sport 53 -j CT --zone 1",
           "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
           "-A ISTIO_OUTPUT_DNS -p udp -m udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
           "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
           "-A ISTIO_OUTPUT_DNS -p udp -m udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
           f"-A ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p udp -m udp --dport 53 -j CT --zone 2", "COMMIT"]
DROP_MANGLE = ["*mangle", ":ISTIO_DROP - [0:0]", "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
               "-A ISTIO_DROP -j DROP", "COMMIT"]
# -c eth2's RETURN is appended (step 1); -k eth1's RETURN (step 2) and ISTIO_REDIRECT (step 16)
# are both inserted at 1, so the later one, the redirect, ends up first.
WITH_PORTS_AND_INTERFACES = _default_nat(
    4, prerouting=["-A PREROUTING -i eth1 -j ISTIO_REDIRECT", "-A PREROUTING -i eth1 -j RETURN",
                   "-A PREROUTING -i eth2 -j RETURN"],
    output=["-A OUTPUT -o eth2 -j RETURN"],
    extra_output_first=["-A ISTIO_OUTPUT -p tcp -m tcp --dport 25 -j RETURN",
                        "-A ISTIO_OUTPUT -p udp -m udp --dport 25 -j RETURN"],
    extra_output_last=["-A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j ISTIO_REDIRECT"])

# name -> (extra args, extra env, IPv6 pod, expected IPv4 text, expected IPv6 text)
INJECTED_CASES = {
    "default": ([], {}, False, _default_nat(4), None),
    "log_as_json": (["--log_as_json"], {}, False, _default_nat(4), None),
    "force_apply": (["--force-apply"], {}, False, _default_nat(4), None),
    "ports_and_interfaces": (["-q", "3306", "-o", "25", "-k", "eth1", "-c", "eth2"], {}, False,
                             WITH_PORTS_AND_INTERFACES, None),
    "dns_capture_env": ([], {"ISTIO_META_DNS_CAPTURE": "true"}, False, _default_nat(4, dns=True) + DNS_RAW, None),
    "invalid_drop_env": ([], {"INVALID_DROP": "true"}, False, DROP_MANGLE + _default_nat(4), None),
    "ipv6_pod": ([], {}, True, _default_nat(4), _default_nat(6)),
}


def istio_init(ns: Namespace, *args: str, env: dict[str, str] | None = None, check: bool = True):
    done = ns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ(env), check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"istio-init {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def _resolv(tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"search example.test\nnameserver {RESOLVER}\n")
    return {"ISTIO_INIT_RESOLV_CONF": str(conf)}


@pytest.mark.parametrize("backend", ("legacy", "nft"))
@pytest.mark.parametrize("name", sorted(INJECTED_CASES))
def test_injected_init_container_applies_rules_current_md(netns: Namespace, name: str, backend: str,
                                                          tmp_path: Path) -> None:
    extra, env, ipv6, want_v4, want_v6 = INJECTED_CASES[name]
    if ipv6:
        netns.add_address("2001:db8::10/64")  # the pod's first address is IPv6: no --ipv6 flag
    else:
        netns.add_address("192.0.2.10/24")
    env = {**IMAGE_ENV, **_resolv(tmp_path), **env, "ISTIO_IPTABLES_BACKEND": backend}
    done = istio_init(netns, *INJECTED, *extra, env=env)
    tool = f"iptables-{backend}-save"
    assert normalize(netns.save(tool)) == normalize("\n".join(want_v4) + "\n")
    assert normalize(netns.save(f"ip6{tool[2:]}")) == (normalize("\n".join(want_v6) + "\n") if want_v6 else {})
    if "--log_as_json" in extra:
        import json

        assert all(json.loads(line)["msg"] for line in done.stderr.splitlines())
    # The same init container again (a restarted pod sandbox): nothing changes.
    before = normalize(netns.save(tool)), normalize(netns.save(f"ip6{tool[2:]}"))
    istio_init(netns, *INJECTED, *extra, env=env)
    assert (normalize(netns.save(tool)), normalize(netns.save(f"ip6{tool[2:]}"))) == before


def test_cni_validation_variant_checks_rules_installed_by_someone_else(netns: Namespace, tmp_path: Path) -> None:
    env = {**IMAGE_ENV, **_resolv(tmp_path)}
    validation = [*INJECTED, "--run-validation", "--skip-rule-apply", "--probe-timeout", "2s"]
    missing = istio_init(netns, *validation, env=env, check=False)
    assert missing.returncode == 126, missing.stderr
    assert "ISTIO_" not in netns.save()
    istio_init(netns, *INJECTED, env=env)  # what istio-cni would have installed
    installed = normalize(netns.save())
    checked = istio_init(netns, *validation, env=env, check=False)
    assert checked.returncode == 0, checked.stderr
    assert normalize(netns.save()) == installed


@pytest.mark.parametrize("backend", ("libiptc", "legacy", "nft"))
def test_converge_between_rule_sets_keeps_unrelated_rules(netns: Namespace, backend: str) -> None:
    flavour = "nft" if backend == "nft" else "legacy"
    for family, text in ((4, UNRELATED_V4), (6, UNRELATED_V6)):
        netns.run(f"ip{'6' if family == 6 else ''}tables-{flavour}-restore", "--noflush", input=text)
    fresh = routing(netns)
    tproxy_current = ["-m", "TPROXY", "-b", "*", "-i", "*", "-c", "eth2", "--drop-invalid"]
    steps = [("1.8", SEED_ARGS), ("current", [*SEED_ARGS, "-c", "eth2"]), ("1.8", ["-m", "TPROXY", "-b", "80"]),
             ("current", tproxy_current), ("1.8", SEED_ARGS)]
    for version, args in steps:
        istio_init(netns, *args, "--rules-version", version, "--ipv6", "true", "--iptables-backend", backend)
        dry = istio_init(netns, *args, "--rules-version", version, "--ipv6", "true", "-n").stdout
        for family, part in enumerate(split_families(dry)):
            saved = normalize(netns.save(f"ip{'6' if family else ''}tables-{flavour}-save"))
            unrelated = normalize(UNRELATED_V6 if family else UNRELATED_V4)
            planned = normalize(part)
            for table in set(saved) | set(planned) | set(unrelated):
                ours = [line for line in saved.get(table, []) if line not in unrelated.get(table, [])]
                assert ours == planned.get(table, []), (version, args, family, table)
        marked = [r for r in routing(netns)["rules"] if any(k == "FRA_FWMARK" for k, _ in r)]
        assert len(marked) == (0 if "TPROXY" not in args else 1 if version == "1.8" else 2), (version, args)
    istio_init(netns, "clean", "--iptables-backend", backend)
    assert routing(netns) == fresh
    for family, text in ((4, UNRELATED_V4), (6, UNRELATED_V6)):
        assert normalize(netns.save(f"ip{'6' if family == 6 else ''}tables-{flavour}-save")) == normalize(text)


RERUN_CASES = [c for c in CURRENT_CASES if c.name in ("tproxy", "basic-exclude-nic", "drop-invalid", "dns-uid-gid",
                                                      "inbound-ports-wildcard-tproxy", "ipv6-virt-interfaces")]


@pytest.mark.parametrize("backend", ("libiptc", "legacy", "nft"))
@pytest.mark.parametrize("case", RERUN_CASES, ids=lambda c: c.name)
def test_current_rerun_changes_nothing_and_clean_removes_everything(netns: Namespace, case, backend: str,
                                                                    tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(case.resolv_conf())
    env = {**case.env, "ISTIO_INIT_RESOLV_CONF": str(conf)}
    flavour = "nft" if backend == "nft" else "legacy"
    args = [*case.argv(dry_run=False), "--iptables-backend", backend]
    fresh = routing(netns)
    istio_init(netns, *args, env=env)
    before = netns.save(f"iptables-{flavour}-save"), netns.save(f"ip6tables-{flavour}-save")
    istio_init(netns, *args, env=env)
    after = netns.save(f"iptables-{flavour}-save"), netns.save(f"ip6tables-{flavour}-save")
    assert [normalize(t) for t in after] == [normalize(t) for t in before]
    istio_init(netns, "clean", "--iptables-backend", backend)
    assert normalize(netns.save(f"iptables-{flavour}-save")) == {}
    assert normalize(netns.save(f"ip6tables-{flavour}-save")) == {}
    assert routing(netns) == fresh  # TPROXY's rule and route in both families, ::6 on lo: gone


def test_cni_mode_locks_the_pods_namespace_not_the_node(netns: Namespace, tmp_path: Path) -> None:
    """Another process holds the node's xtables lock; a --cni-mode run for one pod is not held up."""
    node_lock = tmp_path / "xtables.lock"
    with open(node_lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = istio_init(netns, *SEED_ARGS, "--rules-version", "current",
                          "--cni-mode", "--network-namespace", netns.name, "--iptables-backend", "libiptc",
                          "--ipv6", "false", env={"XTABLES_LOCKFILE": str(node_lock)})
        assert done.returncode == 0
    assert "-A ISTIO_OUTPUT" in netns.save()
    os.unlink(node_lock)


def test_cleanup_only_variable_removes_the_rules(netns: Namespace) -> None:
    istio_init(netns, *INJECTED, "--ipv6", "false", env=IMAGE_ENV)
    assert "ISTIO_OUTPUT" in netns.save()
    bad = istio_init(netns, *INJECTED, "--ipv6", "false", env={**IMAGE_ENV, "CLEANUP_ONLY": "maybe"}, check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "istio-init: invalid value for --cleanup-only (from CLEANUP_ONLY): 'maybe': must be true or false"]
    assert "ISTIO_OUTPUT" in netns.save()
    istio_init(netns, *INJECTED, "--ipv6", "false", env={**IMAGE_ENV, "CLEANUP_ONLY": "true"})
    assert normalize(netns.save()) == {}
