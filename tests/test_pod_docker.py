"""The image as a pod's init container, in real containers sharing one network namespace.

A "pause" container owns the pod's network namespace (198.51.100.10 on a Docker network made
for this run with a documentation subnet, never Docker's default bridge). The image runs in it
with the seed's capabilities and `args:` verbatim, as the kubelet would run the init container;
then a stand-in proxy (uid 1337, listening on 15001 and 15006 and answering with the port it
accepted on and SO_ORIGINAL_DST), an application container in the pod, and a client container
outside it (198.51.100.20). The test checks where connections land in both directions, then
runs the image again in the same pod (an init container restart) and checks the rules did not
change. Needs a Docker engine and the image (scripts/build-image); skipped otherwise.

It runs twice: the seed's pod with the default image (rule set 1.8), and the same pod as current
Istio injects it (its args end with `--log_output_level=default:info`) with the image built for
current Istio (`RULES_VERSION=current IMAGE=istio-init:current scripts/build-image`), which must
pick the current rule set from its own default, with no env in the pod.
"""

from __future__ import annotations

import pytest

from dockerpod import SEED_SECURITY, VARIANTS, Pod, check_traffic, docker, nat_appends
from dockerpod import pod  # noqa: F401  (the fixture: a pause container on its own network)

pytestmark = pytest.mark.docker


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def test_seed_init_container_captures_pod_traffic(pod: Pod, variant: str) -> None:
    image, args = VARIANTS[variant]
    # Docker's embedded DNS already has NAT rules in the pod; they must stay as they are.
    before = nat_appends(pod.iptables_save("save-before"))
    first = pod.init("init", image, args)
    assert first.returncode == 0, f"init container failed ({first.returncode}):\n{first.stderr}"
    rules = pod.iptables_save("save-first")

    # What the init container added is exactly the seed's dry run (its -A lines, in order).
    dry_run = docker("run", "--rm", "--name", pod.name("dryrun"), *pod.in_pod(), *SEED_SECURITY,
                     image, *args, "-n").stdout
    assert nat_appends(dry_run), dry_run
    # The image's default rule set: 1.8's `-p tcp` OUTPUT jump, or current Istio's without it.
    assert ("-A OUTPUT -p tcp -j ISTIO_OUTPUT" in dry_run) == (variant == "1.8"), dry_run
    assert ("-A OUTPUT -j ISTIO_OUTPUT" in dry_run) == (variant == "current"), dry_run
    assert [rule for rule in nat_appends(rules) if rule not in before] == nat_appends(dry_run), rules
    assert all(rule in nat_appends(rules) for rule in before), rules

    processes = pod.start_processes()
    check_traffic(*processes)

    # An init container restart: the same image and args again in the same pod.
    second = pod.init("init-again", image, args)
    assert second.returncode == 0, f"second init run failed ({second.returncode}):\n{second.stderr}"
    assert pod.iptables_save("save-again") == rules
    check_traffic(*processes)


def test_native_nftables_init_container_captures_pod_traffic(pod: Pod, variant: str) -> None:
    """The same pod with `--native-nftables` added to the args (current Istio's nftables mode):
    the image programs the pod with libnftables, nothing of istio-init's lands in iptables, the
    traffic goes where the iptables form sends it, and a restart leaves the ruleset as it was."""
    image, args = VARIANTS[variant]
    args = [*args, "--native-nftables"]
    first = pod.init("init", image, args)
    assert first.returncode == 0, f"init container failed ({first.returncode}):\n{first.stderr}"
    ruleset = pod.nft_list("list-first")
    transaction = docker("run", "--rm", "--name", pod.name("dryrun"), *pod.in_pod(), *SEED_SECURITY,
                         image, *args, "-n").stdout
    chains = [line.split()[4] for line in transaction.splitlines() if line.startswith("add chain inet ")]
    assert "istio-output" in chains and "table inet istio-proxy-nat {" in ruleset, ruleset
    assert all(f"chain {chain} {{" in ruleset for chain in chains), (chains, ruleset)
    assert "ISTIO_" not in pod.iptables_save("save-first")  # nothing of ours in either iptables

    processes = pod.start_processes()
    check_traffic(*processes)

    second = pod.init("init-again", image, args)
    assert second.returncode == 0, f"second init run failed ({second.returncode}):\n{second.stderr}"
    assert pod.nft_list("list-again") == ruleset
    check_traffic(*processes)
