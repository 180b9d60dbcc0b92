"""Interface names the kernel reads as wildcards: refused, or stored exactly as the dry run prints them.

issue 19, finding 1: `-k +` was accepted, printed as `-i + -j RETURN` by the
dry run, stored by every backend as "any interface" (no `-i` at all), so
inbound capture was off, every re-run appended another `-A PREROUTING -j
RETURN`, and `clean` left them all. A `+` alone is now refused naming the
flag; every accepted name (Hypothesis over an alphabet rich in `+` and `*`)
is stored exactly as the dry run says, and a re-run adds nothing.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clirun import invoke
from hostile import istio_init, pod_namespace
from istio_init import ifnames
from nsutil import Namespace

_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# Names made mostly of the characters iptables and nft give a meaning to.
_WILDCARDISH = st.text(alphabet="+*a0.é", min_size=1, max_size=5)


@pytest.mark.parametrize("argv,env,label", [
    (["-k", "+"], {}, "-k/--kube-virt-interfaces"),
    (["-k", "eth1,+"], {}, "-k/--kube-virt-interfaces"),
    ([], {"KUBE_VIRT_INTERFACES": "+"}, "-k/--kube-virt-interfaces (from KUBE_VIRT_INTERFACES)"),
    (["--rules-version", "current", "-c", "+"], {}, "-c/--istio-exclude-interfaces"),
    (["--rules-version", "current"], {"ISTIO_EXCLUDE_INTERFACES": "+"},
     "-c/--istio-exclude-interfaces (from ISTIO_EXCLUDE_INTERFACES)"),
])
def test_a_plus_alone_is_refused_naming_the_flag(argv: list[str], env: dict[str, str], label: str) -> None:
    result = invoke(["-n", *argv], env)
    assert result.code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"istio-init: invalid value for {label}: '+': " + str(ifnames.common_refusal("+"))]


@pytest.mark.parametrize("name", ["++", "a+", "vnet+", "a+b", "*", "a*", "+a"])
def test_other_names_with_plus_or_star_are_taken(name: str) -> None:
    result = invoke(["-n", "-k", name])
    assert result.code == 0, result.stderr
    assert f"-A PREROUTING -i {name} -j RETURN" in result.stdout.splitlines()


def _prerouting(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A PREROUTING")]


@pytest.fixture(scope="module")
def pod() -> Namespace:
    ns = pod_namespace("wild")
    try:
        yield ns
    finally:
        ns.remove()


@pytest.mark.root
@_SETTINGS
@given(_WILDCARDISH)
def test_every_accepted_name_is_stored_as_the_dry_run_says(pod: Namespace, name: str) -> None:
    """Refused with exit 2 naming -k, or (legacy and nft tools) the kernel's rules equal the dry run's, twice."""
    for backend, save in (("legacy", "iptables-legacy-save"), ("nft", "iptables-nft-save")):
        dry = istio_init(pod, "-k", name, "--iptables-backend", backend, "-n")
        if dry.returncode == 2:
            assert "-k/--kube-virt-interfaces" in dry.stderr and len(dry.stderr.splitlines()) == 1
            applied = istio_init(pod, "-k", name, "--iptables-backend", backend)
            assert applied.returncode == 2, applied.stderr
            continue
        assert dry.returncode == 0, dry.stderr
        for _ in range(2):  # a re-run converges to the same rules: nothing appended
            applied = istio_init(pod, "-k", name, "--iptables-backend", backend)
            assert applied.returncode == 0, applied.stderr
            stored = pod.run(save, "-t", "nat").stdout
            assert _prerouting(stored) == _prerouting(dry.stdout), (name, stored)
        cleaned = istio_init(pod, "clean", "--iptables-backend", backend)
        assert cleaned.returncode == 0, cleaned.stderr
        assert _prerouting(pod.run(save, "-t", "nat").stdout) == []


def _meaning(text: str) -> tuple[str, bool]:
    """(the name, whether it is a prefix) of an nft interface string: an unescaped trailing `*` is a prefix."""
    prefix = text.endswith("*") and not text.endswith("\\*")
    return (text[:-1] if prefix else text).replace("\\*", "*"), prefix


@pytest.mark.root
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_WILDCARDISH)
def test_native_nftables_stores_the_interface_the_transaction_names(pod: Namespace, name: str) -> None:
    """nft reads a trailing `*` as a prefix: the transaction's `iifname` is what nft lists back."""
    dry = istio_init(pod, "-k", name, "--native-nftables", "-n")
    if dry.returncode == 2:
        return
    assert dry.returncode == 0, dry.stderr
    applied = istio_init(pod, "-k", name, "--native-nftables")
    assert applied.returncode == 0, applied.stderr
    listed = json.loads(pod.run("nft", "-j", "list", "table", "inet", "istio-proxy-nat").stdout)
    stored = [expr["match"]["right"] for obj in listed["nftables"] if "rule" in obj
              for expr in obj["rule"]["expr"] if "match" in expr
              and expr["match"]["left"] == {"meta": {"key": "iifname"}}]
    planned = [line.split('iifname "', 1)[1].split('"', 1)[0] for line in dry.stdout.splitlines()
               if "iifname" in line]
    assert [_meaning(s) for s in stored] == [_meaning(p) for p in planned] and stored, (name, stored, planned)
    subprocess.run(["nsenter", f"--net={pod.path}", "nft", "flush", "ruleset"], check=True)
