"""`istio-init graph`: the chains as a directed graph, in Mermaid, DOT, SVG, text or JSON.

A rule set is easier to check as a picture than as forty lines of
iptables-save: which hook enters which chain, under which match, and where
each path ends. Nodes are the built-in hooks that hold rules and the user
chains (each listing its rules, numbered as `iptables -L --line-numbers`
does); a jump is an edge labelled with its rule number and match; every
other target is an end node named by its outcome (`REDIRECT :15001`,
`RETURN`, `TPROXY :15006 mark 0x539`). Edges between the same two nodes are
one edge with one label line per rule.

`build` is pure: it takes rule text per family, table and chain (from the
plan, or from iptables-save for `--live`) and returns the graph as data;
the renderers turn that into text. Only SVG runs a program (Graphviz's dot).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING, NamedTuple

from istio_init.check import Chains, chains_from_plan
from istio_init.errors import GraphError
from istio_init.iptables_save.read import rule_words
from istio_init.iptables_save.write import chain_order
from istio_init.model import is_builtin

if TYPE_CHECKING:
    from istio_init.config import Config
    from istio_init.runner import Log

TABLES = ("raw", "mangle", "nat")  # the order a packet meets them
FORMATS = ("mermaid", "dot", "svg", "text", "json")
DOT_TIMEOUT_SECONDS = 30
_CAPTURING = ("REDIRECT", "TPROXY", "DNAT")
_LETTING_GO = ("RETURN", "ACCEPT")
_DROPPING = ("DROP", "REJECT")


class Node(NamedTuple):
    id: str  # chains: "nat/ISTIO_OUTPUT" ("ip6/nat/ISTIO_OUTPUT" for IPv6); outcomes: "o1", "o2", ...
    kind: str  # "hook", "chain" or "outcome"
    label: str  # chains: "nat/ISTIO_OUTPUT"; outcomes: the outcome only
    rules: tuple[str, ...] = ()  # "1: -p tcp -j ISTIO_INBOUND", ...


class Edge(NamedTuple):
    source: str
    target: str
    labels: tuple[str, ...]  # one per rule: "2: !127.0.0.1 out lo uid 1337"


class Cluster(NamedTuple):
    family: int
    table: str
    nodes: tuple[Node, ...]


class Graph(NamedTuple):
    clusters: tuple[Cluster, ...]
    edges: tuple[Edge, ...]

    def nodes(self) -> list[Node]:
        return [node for cluster in self.clusters for node in cluster.nodes]


# --------------------------------------------------------------------------- rule text -> labels


def _split(spec: str) -> tuple[list[str], str, list[str]]:
    """(condition words, target, target option words) of one rule spec."""
    words = rule_words(spec)  # as iptables-save quotes: an interface may hold a ' or a \
    for i, word in enumerate(words):
        if word in ("-j", "-g") and i + 1 < len(words):
            return words[:i], words[i + 1], words[i + 2:]
    return words, "", []


_MODULES_SHOWN_BY_OPTIONS = ("tcp", "udp", "owner", "conntrack", "multiport", "mark", "state")
_OPTION_NAMES = {"uid-owner": "uid", "gid-owner": "gid", "ctstate": "ctstate", "state": "state", "mark": "mark"}


def match_label(spec: str) -> str:
    """A rule's match in few words: `--dport 15021`, `uid 1337`, `!127.0.0.1 out lo`.

    `-p tcp` is left out when another condition says more (almost every rule
    is TCP); addresses lose their /32 or /128.
    """
    words, _, _ = _split(spec)
    parts: list[str] = []
    protocol = ""
    negated = False
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else ""
        if word == "!":
            negated = True
            i += 1
            continue
        bang = "!" if negated else ""
        negated = False
        if word in ("-s", "-d", "-i", "-o", "-p", "-m"):
            i += 2
            if word == "-p":
                protocol = bang + value
            elif word == "-m":
                if value not in _MODULES_SHOWN_BY_OPTIONS:
                    parts.append(f"-m {value}")
            else:
                shown = value.removesuffix("/32").removesuffix("/128") if word in ("-s", "-d") else value
                prefix = {"-s": "src ", "-d": "", "-i": "in ", "-o": "out "}[word]
                parts.append(f"{bang}{prefix}{shown}")
        elif word.startswith("--"):
            has_value = bool(value) and not value.startswith("-") and value != "!"
            i += 2 if has_value else 1
            name = _OPTION_NAMES.get(word[2:], word)
            parts.append(f"{bang}{name}{' ' + value if has_value else ''}")
        else:
            parts.append(bang + word)
            i += 1
    if protocol and (protocol != "tcp" or not parts):
        parts.insert(0, protocol)
    return " ".join(parts)


def outcome_label(spec: str) -> str:
    """What a non-jump rule does, named by the outcome only: `REDIRECT :15001`, `CT zone 1`."""
    _, target, words = _split(spec)
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            options[word[2:]] = "" if nxt.startswith("--") else nxt

    def mark(value: str) -> str:
        return value.removesuffix("/0xffffffff")

    if target == "REDIRECT" and "to-ports" in options:
        return f"REDIRECT :{options['to-ports']}"
    if target == "TPROXY":
        shown = f"TPROXY :{options.get('on-port', '?')}"
        return shown + (f" mark {mark(options['tproxy-mark'])}" if "tproxy-mark" in options else "")
    if target == "DNAT" and "to-destination" in options:
        return f"DNAT {options['to-destination']}"
    if target == "SNAT" and "to-source" in options:
        return f"SNAT {options['to-source']}"
    if target in ("MARK", "CONNMARK") and options:
        return f"{target} {' '.join(mark(v) for v in options.values())}"
    if target == "CT" and "zone" in options:
        return f"CT zone {options['zone']}"
    if target == "CT" and "notrack" in options:
        return "CT notrack"
    return " ".join([target or "(no target)", *words])


# --------------------------------------------------------------------------- the graph as data


def chain_id(family: int, table: str, chain: str) -> str:
    return f"{table}/{chain}" if family == 4 else f"ip6/{table}/{chain}"


def build(rules: dict[int, Chains], tables: tuple[str, ...] = TABLES) -> Graph:
    """The graph of `rules` (family -> table -> chain -> specs) for the given tables.

    Drawn are built-in chains that hold rules and every user chain; a family
    or table with nothing drawn is left out.
    """
    clusters: list[Cluster] = []
    edges: dict[tuple[str, str], list[str]] = {}
    outcomes = 0
    for family in sorted(rules):
        for table in (t for t in TABLES if t in tables):
            chains = rules[family].get(table, {})
            drawn = [c for c in chain_order(table, list(chains)) if chains[c] or not is_builtin(table, c)]
            nodes: list[Node] = []
            for chain in drawn:
                source = chain_id(family, table, chain)
                specs = chains[chain]
                kind = "hook" if is_builtin(table, chain) else "chain"
                nodes.append(Node(source, kind, f"{table}/{chain}",
                                  tuple(f"{n}: {spec}" for n, spec in enumerate(specs, 1))))
                ends: dict[str, str] = {}
                for n, spec in enumerate(specs, 1):
                    target = _split(spec)[1]
                    if target in chains and not is_builtin(table, target):
                        destination = chain_id(family, table, target)
                    else:
                        label = outcome_label(spec)
                        if label not in ends:
                            outcomes += 1
                            ends[label] = f"o{outcomes}"
                            nodes.append(Node(ends[label], "outcome", label))
                        destination = ends[label]
                    match = match_label(spec)
                    edges.setdefault((source, destination), []).append(f"{n}: {match or 'any'}")
            if nodes:
                clusters.append(Cluster(family, table, tuple(nodes)))
    return Graph(tuple(clusters), tuple(Edge(s, t, tuple(labels)) for (s, t), labels in edges.items()))


def _outcome_kind(label: str) -> str:
    word = label.split()[0]
    if word in _CAPTURING:
        return "capture"
    if word in _DROPPING:
        return "drop"
    return "pass" if word in _LETTING_GO else "other"


# --------------------------------------------------------------------------- renderers


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_lines(lines: list[str]) -> str:
    """A left-justified multi-line DOT label (each line ends in \\l)."""
    body = "".join(line.replace("\\", "\\\\").replace('"', '\\"') + "\\l" for line in lines)
    return f'"{body}"'


_DOT_OUTCOME_COLOURS = {"capture": "palegreen", "pass": "lightyellow", "drop": "lightpink", "other": "lightgrey"}


def to_dot(graph: Graph) -> str:
    lines = ["digraph istio_init {", "  rankdir=LR;",
             '  node [fontname="monospace", fontsize=10];', '  edge [fontname="monospace", fontsize=9];']
    for cluster in graph.clusters:
        name = f"cluster_ipv{cluster.family}_{cluster.table}"
        lines.append(f"  subgraph {name} {{")
        lines.append(f"    label={_dot_quote(f'IPv{cluster.family} {cluster.table}')};")
        for node in cluster.nodes:
            if node.kind == "outcome":
                colour = _DOT_OUTCOME_COLOURS[_outcome_kind(node.label)]
                lines.append(f"    {_dot_quote(node.id)} [label={_dot_quote(node.label)}, shape=ellipse, "
                             f"style=filled, fillcolor={colour}];")
            else:
                style = ', style="rounded,filled", fillcolor=lightblue' if node.kind == "hook" else ""
                lines.append(f"    {_dot_quote(node.id)} [label={_dot_lines([node.label, *node.rules])}, "
                             f"shape=box{style}];")
        lines.append("  }")
    for edge in graph.edges:
        lines.append(f"  {_dot_quote(edge.source)} -> {_dot_quote(edge.target)} [label={_dot_lines(list(edge.labels))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_id(node_id: str) -> str:
    return node_id.replace("/", "_")


def _mermaid_text(lines: list[str]) -> str:
    escaped = [line.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
               for line in lines]
    return '"' + "<br/>".join(escaped) + '"'


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]
    for cluster in graph.clusters:
        lines.append(f'  subgraph ipv{cluster.family}_{cluster.table}["IPv{cluster.family} {cluster.table}"]')
        for node in cluster.nodes:
            if node.kind == "outcome":
                lines.append(f"    {_mermaid_id(node.id)}([{_mermaid_text([node.label])}])")
            else:
                lines.append(f"    {_mermaid_id(node.id)}[{_mermaid_text([node.label, *node.rules])}]")
        lines.append("  end")
    for edge in graph.edges:
        lines.append(f"  {_mermaid_id(edge.source)} -->|{_mermaid_text(list(edge.labels))}| {_mermaid_id(edge.target)}")
    return "\n".join(lines) + "\n"


def to_svg(dot_text: str) -> str:
    """DOT through Graphviz's `dot -Tsvg`."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphError("--format svg needs Graphviz's dot, which is not installed "
                         "(Debian package graphviz: apt-get install graphviz)")
    try:
        done = subprocess.run([dot, "-Tsvg"], input=dot_text, capture_output=True, text=True,
                              timeout=DOT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise GraphError(f"dot did not finish in {DOT_TIMEOUT_SECONDS}s") from None
    if done.returncode != 0:
        raise GraphError(f"dot refused the graph: {done.stderr.strip()}")
    return done.stdout


def to_text(graph: Graph) -> str:
    """The graph for a terminal: each chain's rules, each followed by where it leads."""
    names = {node.id: node.label for node in graph.nodes()}
    leads: dict[tuple[str, str], str] = {}  # (chain id, rule number) -> target's label
    for edge in graph.edges:
        for label in edge.labels:
            leads[(edge.source, label.split(":", 1)[0])] = names[edge.target]
    lines: list[str] = []
    for cluster in graph.clusters:
        lines.append(f"IPv{cluster.family} {cluster.table}")
        for node in cluster.nodes:
            if node.kind == "outcome":
                continue
            lines.append(f"  {node.label}{' (built-in)' if node.kind == 'hook' else ''}")
            for rule in node.rules:
                number = rule.split(":", 1)[0]
                lines.append(f"    {rule}  -> {leads.get((node.id, number), '?')}")
            if not node.rules:
                lines.append("    (no rules)")
    return "\n".join(lines) + "\n"


def to_json(graph: Graph) -> str:
    """The graph as data, for scripts: clusters of nodes, and edges with one label per rule."""
    import json

    return json.dumps({
        "clusters": [{"family": c.family, "table": c.table, "nodes": [n._asdict() for n in c.nodes]}
                     for c in graph.clusters],
        "edges": [e._asdict() for e in graph.edges],
    }, indent=2) + "\n"


def render(graph: Graph, fmt: str) -> str:
    if fmt == "mermaid":
        return to_mermaid(graph)
    if fmt == "text":
        return to_text(graph)
    if fmt == "json":
        return to_json(graph)
    if fmt == "dot":
        return to_dot(graph)
    if fmt == "svg":
        return to_svg(to_dot(graph))
    raise GraphError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


# --------------------------------------------------------------------------- the command


def planned_rules(config: Config, log: Log) -> dict[int, Chains]:
    """The rules the flags would install, per family."""
    from istio_init import runner

    rule_plan, _ = runner.build_plan(config, log)
    return {family.family: chains_from_plan(family) for family in rule_plan.families()}


def live_rules(config: Config) -> dict[int, Chains]:
    """The installed rules: native nftables tables with --native-nftables, else those of the iptables
    store holding istio-init's (installed.py: as `check` and `trace` read them)."""
    from istio_init import check

    if config.native_nftables:
        return live_nft_rules()
    store, rules = check.read_rules(config.iptables_backend)
    return rules.get(store, {})


def live_nft_rules() -> dict[int, Chains]:
    """Our `inet istio-proxy-*` tables in iptables' terms, per family (as `trace --live` reads them).

    The tables are `inet`, so each rule is drawn in every family it acts on;
    a family whose packets no built-in chain sends into our chains is left out.
    """
    from istio_init.trace import read_live_native
    from istio_init.iptables_save.write import rule_spec

    drawn: dict[int, Chains] = {}
    for family in (4, 6):
        ruleset, _ = read_live_native(family)
        chains = {table: {chain: [rule_spec(rule) for rule in rules] for chain, rules in by_chain.items()}
                  for table, by_chain in ruleset.items()}
        if family == 4 or any(specs for table, by_chain in chains.items()
                              for chain, specs in by_chain.items() if is_builtin(table, chain)):
            drawn[family] = chains
    return drawn


def draw(config: Config, live: bool, fmt: str, table: str, log: Log) -> str:
    """`istio-init graph` in the current namespace: the plan for `config`, or the live rules, drawn."""
    if fmt not in FORMATS:
        raise GraphError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    tables = TABLES if table == "all" else (table,)
    rules = live_rules(config) if live else planned_rules(config, log)
    return render(build(rules, tables), fmt)
