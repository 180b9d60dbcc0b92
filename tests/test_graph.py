"""`istio-init graph`: the picture has exactly the plan's chains and jumps, in every format.

Graphviz itself reads the DOT text (`dot -Tjson0`), so "dot accepts it" and
"its nodes and edges are the plan's" are checked on what Graphviz parsed,
not on our own text. The Mermaid output is parsed back and must give the same
nodes and edges. The expected chains and jumps come from the FamilyPlan
directly, not from graph.py. With root, `--live` right after an apply must
draw the same picture as the plan.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest

from cases import CASES, SEED_ARGS
from cases_current import CURRENT_CASES, RULES
from clirun import clean_environ, given, invoke
from istio_init.config import from_sources
from istio_init.model import is_builtin
from istio_init.iptables_save.write import rule_spec
from istio_init.rulesets import plan
from nsutil import Namespace

DOCS = Path(__file__).parent.parent / "docs"
SEED_PICTURE_ARGS = [*SEED_ARGS[1:], "--ipv6", "false"]  # the seed's flags, IPv4 pod
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (scripts/setup)")

# A node: (cluster label, label lines); an edge: (cluster, source's first line, target's first line, label lines).
Node = tuple[str, tuple[str, ...]]
Edge = tuple[str, str, str, tuple[str, ...]]


class Case(NamedTuple):
    """A golden case of either rule set: flags, environment, IP family, the pod's resolvers."""

    name: str
    args: tuple[str, ...]
    ipv6: bool
    env: dict[str, str]
    resolvers: tuple[str, ...] = ()


ALL_CASES = ([Case(c.name, c.args, c.ipv6, c.env) for c in CASES]
             + [Case(f"current-{c.name}", (*RULES, *c.args), c.ipv6, c.env, c.resolvers) for c in CURRENT_CASES])


def _args(case: Case) -> list[str]:
    return [*(a for a in case.args if a != "istio-iptables"), "--ipv6", "true" if case.ipv6 else "false"]


def _env(case: Case, tmp_path: Path) -> dict[str, str]:
    """The case's environment and a resolv.conf of its resolvers (never the host's)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("".join(f"nameserver {server}\n" for server in case.resolvers))
    return {**case.env, "ISTIO_INIT_RESOLV_CONF": str(resolv)}


def graph_text(case_args: list[str], fmt: str, env: dict | None = None) -> str:
    out = invoke(["graph", *case_args, "--format", fmt], env)
    assert out.code == 0, out.stderr
    return out.stdout


def parse_dot(text: str) -> tuple[dict[str, Node], Counter[Edge]]:
    """What Graphviz read: node name -> (cluster, label lines), and the edges."""
    done = subprocess.run(["dot", "-Tjson0"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    cluster_of = {gvid: obj["label"] for obj in data["objects"] if "nodes" in obj for gvid in obj["nodes"]}
    nodes = {obj["_gvid"]: (obj["name"], cluster_of[obj["_gvid"]], tuple(obj["label"].split("\\l")[:-1] or [obj["label"]]))
             for obj in data["objects"] if "nodes" not in obj}
    named = {name: (cluster, label) for name, cluster, label in nodes.values()}
    edges: Counter[Edge] = Counter()
    for edge in data.get("edges", []):
        _, cluster, tail = nodes[edge["tail"]]
        _, _, head = nodes[edge["head"]]
        edges[(cluster, tail[0], head[0], tuple(edge["label"].split("\\l")[:-1]))] += 1
    return named, edges


def _unescape(text: str) -> tuple[str, ...]:
    text = text.replace("#quot;", '"').replace("#lt;", "<").replace("#gt;", ">").replace("#amp;", "&")
    return tuple(text.split("<br/>"))


def parse_mermaid(text: str) -> tuple[dict[str, Node], Counter[Edge]]:
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes: dict[str, Node] = {}
    raw_edges = []
    cluster = ""
    for line in lines[1:]:
        if m := re.fullmatch(r'  subgraph \w+\["(.*)"\]', line):
            cluster = m.group(1)
        elif line == "  end":
            cluster = ""
        elif m := re.fullmatch(r'    (\w+)(?:\["(.*)"\]|\(\["(.*)"\]\))', line):
            assert cluster, line
            nodes[m.group(1)] = (cluster, _unescape(m.group(2) if m.group(2) is not None else m.group(3)))
        elif m := re.fullmatch(r'  (\w+) -->\|"(.*)"\| (\w+)', line):
            raw_edges.append((m.group(1), _unescape(m.group(2)), m.group(3)))
        else:
            raise AssertionError(f"unexpected Mermaid line {line!r}")
    edges: Counter[Edge] = Counter((nodes[s][0], nodes[s][1][0], nodes[t][1][0], label) for s, label, t in raw_edges)
    return nodes, edges


def expected_chains_and_jumps(case: Case) -> tuple[dict[str, Node], set[tuple[str, str, str]], dict]:
    """From the plan itself: chain node name -> (cluster, label lines), the jumps, and the rules per node."""

    rule_plan = plan(from_sources(given(case.args), environ=case.env), case.ipv6, case.resolvers)
    chains: dict[str, Node] = {}
    jumps: set[tuple[str, str, str]] = set()
    rules: dict[str, list] = {}
    for family in rule_plan.families():
        for table in family.tables():
            cluster = f"IPv{family.family} {table}"
            final = family.final_rules(table)
            ours = family.chains(table)
            prefix = "" if family.family == 4 else "ip6/"
            for chain in [*(c for c in final if is_builtin(table, c) and final[c]), *ours]:
                specs = final.get(chain, [])
                chains[f"{prefix}{table}/{chain}"] = (cluster, (f"{table}/{chain}", *(
                    f"{n}: {rule_spec(r)}" for n, r in enumerate(specs, 1))))
                rules[f"{prefix}{table}/{chain}"] = specs
                jumps |= {(cluster, f"{table}/{chain}", f"{table}/{r.target}") for r in specs if r.target in ours}
    return chains, jumps, rules


@needs_dot
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_dot_and_mermaid_have_the_plans_chains_and_jumps(case: Case, tmp_path: Path) -> None:
    chains, jumps, rules = expected_chains_and_jumps(case)
    env = _env(case, tmp_path)
    nodes, edges = parse_dot(graph_text(_args(case), "dot", env))

    chain_nodes = {name: node for name, node in nodes.items() if node[1][0].count("/") == 1 and "/" in name}
    outcome_nodes = {name: node for name, node in nodes.items() if name not in chain_nodes}
    assert chain_nodes == chains
    assert all("/" not in label[0] and "ISTIO_" not in label[0] and len(label) == 1
               for _, label in outcome_nodes.values())
    chain_labels = {label[0] for _, label in chains.values()}
    assert {(c, s, t) for c, s, t, _ in edges if t in chain_labels} == jumps

    # Every rule is on exactly one edge out of its chain, under its number; outcomes end the rest.
    for name, (cluster, label) in chains.items():
        numbers = sorted(int(line.split(":")[0]) for (c, s, _, lines), k in edges.items()
                         if c == cluster and s == label[0] for line in lines for _ in range(k))
        assert numbers == list(range(1, len(rules[name]) + 1)), name
        for n, rule in enumerate(rules[name], 1):
            if rule.target == "REDIRECT":
                port = rule.target_options[0].value
                assert any(t == f"REDIRECT :{port}" and any(line.startswith(f"{n}:") for line in lines)
                           for c, s, t, lines in edges if c == cluster and s == label[0])

    mermaid_nodes, mermaid_edges = parse_mermaid(graph_text(_args(case), "mermaid", env))
    assert Counter(mermaid_nodes.values()) == Counter(nodes.values())
    assert mermaid_edges == edges


def test_jump_labels_name_the_match() -> None:
    _, edges = parse_mermaid(graph_text(SEED_PICTURE_ARGS, "mermaid"))
    labels = {line for (_, _, _, lines) in edges for line in lines}
    assert {"4: --dport 15021", "2: !127.0.0.1 out lo uid 1337", "4: uid 1337", "1: src 127.0.0.6 out lo",
            "9: any"} <= labels
    targets = {t for (_, _, t, _) in edges}
    assert {"REDIRECT :15001", "REDIRECT :15006", "RETURN", "nat/ISTIO_IN_REDIRECT"} <= targets


def test_labels_read_rule_text_as_iptables_save_quotes_it() -> None:
    """A live rule's interface may hold a ' or a \\ (printed bare), a comment is quoted: neither breaks a label."""
    from istio_init.graph import match_label

    assert match_label("-i a'b -j RETURN") == "in a'b"
    assert match_label("-o a\\b -j RETURN") == "out a\\b"
    assert match_label('-p tcp -m comment --comment "x \\"y\\"" -j RETURN').endswith('--comment x "y"')


def test_table_filter_and_tproxy_outcomes() -> None:
    args = ["-m", "TPROXY", "-b", "*", "-i", "*", "--redirect-dns", "--ipv6", "false"]
    nodes, _ = parse_mermaid(graph_text([*args, "--table", "mangle"], "mermaid"))
    assert {cluster for cluster, _ in nodes.values()} == {"IPv4 mangle"}
    labels = {label[0] for _, label in nodes.values()}
    assert {"TPROXY :15006 mark 0x539", "MARK 0x539", "ACCEPT", "mangle/ISTIO_DIVERT"} <= labels
    nodes, _ = parse_mermaid(graph_text([*args, "--table", "nat"], "mermaid"))
    assert {"DNAT 127.0.0.1:15053", "SNAT 127.0.0.1", "REDIRECT :15053"} <= {label[0] for _, label in nodes.values()}
    assert graph_text([*args, "--table", "raw"], "mermaid") == "flowchart LR\n"


def test_svg_without_graphviz_is_one_line_naming_the_package(tmp_path: Path) -> None:
    out = invoke(["graph", *SEED_PICTURE_ARGS, "--format", "svg"], {"PATH": str(tmp_path)})
    assert out.code == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "graphviz" in out.stderr and "dot" in out.stderr


def test_bad_format_is_one_line() -> None:
    out = invoke(["graph", "--format", "png"])
    assert out.code == 2 and out.stderr.count("\n") == 1 and "--format" in out.stderr


@needs_dot
def test_the_checked_in_seed_picture_is_what_the_command_draws() -> None:
    """docs/seed-graph.dot and .svg are `istio-init graph SEED --ipv6 false --format dot|svg`."""
    assert (DOCS / "seed-graph.dot").read_text() == graph_text(SEED_PICTURE_ARGS, "dot")
    svg = (DOCS / "seed-graph.svg").read_text()
    made_with = re.search(r"Generated by graphviz version (\S+)", svg)
    installed = subprocess.run(["dot", "-V"], capture_output=True, text=True, timeout=60).stderr
    if made_with is None or made_with.group(1) not in installed:
        pytest.skip(f"docs/seed-graph.svg was drawn by another Graphviz ({installed.strip()}); layouts differ")
    assert svg == graph_text(SEED_PICTURE_ARGS, "svg")


@pytest.mark.root
@needs_dot
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_live_picture_equals_the_plans_right_after_an_apply(netns: Namespace, case: Case, tmp_path: Path) -> None:
    backend = ("libiptc", "legacy", "nft")[ALL_CASES.index(case) % 3]
    args = [*_args(case), "--iptables-backend", backend]
    # Private lock files: other test runs (in other namespaces) holding the machine's must not stall this one.
    case_env = _env(case, tmp_path)
    env = clean_environ({**case_env, "ISTIO_INIT_LOCKFILE": str(tmp_path / "istio-init.lock"),
                         "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")})
    applied = netns.run(sys.executable, "-m", "istio_init", *args, env=env, check=False)
    assert applied.returncode == 0, applied.stderr
    live = netns.run(sys.executable, "-m", "istio_init", "graph", "--live", *args, "--format", "dot", env=env,
                     check=False)
    assert live.returncode == 0, live.stderr
    assert live.stdout == graph_text(args, "dot", case_env)
    parse_dot(live.stdout)
