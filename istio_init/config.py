"""Flags and environment in, one validated immutable `Config` out.

Every value is checked here, before any kernel state is read or changed, so a
typo in a pod spec fails the init container with one line naming the flag
instead of half a rule set (Istio 1.8 printed a warning and dropped bad CIDRs).
Each Config field is declared with its flag row (`flag`): the one place a
flag's names, variable, default, help and per-flag facts are spelled. Both
front doors read the rows' grammar (`option_words`; cli.py builds its click
options from the same names), and from_sources turns the rows into a Config.
"""

from __future__ import annotations

import os
from itertools import repeat

from istio_init.errors import ConfigError
from istio_init.records import TYPE_CHECKING, Declared, Generic, NamedTuple, TypeVar, declarations

# No `re`, `functools` or `typing` at import or on a run with the usual values: with what they import
# they are start-up time (docs/performance.md, "What start-up avoids"). Rarely used forms compile a pattern then.
if TYPE_CHECKING:
    from types import MappingProxyType
    from typing import Any, Mapping, Never, Sequence
else:
    MappingProxyType = type(type.__dict__)  # what types.MappingProxyType is



class Cidr(NamedTuple):
    """A validated CIDR in network form (`10.1.2.3/8` -> `10.0.0.0/8`), as rules spell it."""

    text: str
    version: int
    is_loopback: bool

    def __str__(self) -> str:
        return self.text


Item = TypeVar("Item", covariant=True)


class AllOrList(NamedTuple, Generic[Item]):
    """A value that is either `*` (everything) or a list: -b's ports, -i's CIDRs, the owner groups to include.

    One type, so no rule set, renderer or summary can read a list while
    forgetting the wildcard beside it. True when it selects anything at all.
    """

    all: bool = False
    items: tuple[Item, ...] = ()

    def __bool__(self) -> bool:
        return self.all or bool(self.items)

    def __str__(self) -> str:
        return WILDCARD if self.all else ",".join(map(str, self.items))


# `*`, and the empty list; of any item type (Never: no item at all).
EVERYTHING: AllOrList[Never] = AllOrList(True)
NOTHING: AllOrList[Never] = AllOrList()


# An IPv4 octet and prefix length as rules spell them: decimal, no leading zeros.
_OCTETS = frozenset(map(str, range(256)))
_PREFIXES = frozenset(map(str, range(33)))


def _simple_ipv4_cidr(text: str) -> tuple[list[str], str | None] | None:
    """`a.b.c.d` or `a.b.c.d/N` as (octets, prefix or None); None for any other form."""
    address, slash, prefix = text.partition("/")
    octets = address.split(".")
    if len(octets) != 4 or not _OCTETS.issuperset(octets) or (slash and prefix not in _PREFIXES):
        return None
    return octets, prefix if slash else None


def _ipv4_host_list(items: list[str], joined: str) -> bool:
    """Whether every item is an IPv4 host address (`a.b.c.d` or `a.b.c.d/32`), checked over the whole list.

    C loops instead of a Python loop over (up to 8,000) items: with the `/32`s
    taken off, each item must be what the C library's inet_pton reads as an
    IPv4 address, which is exactly four decimal octets 0-255 without leading
    zeros (tests/test_cidr.py holds it to ipaddress).
    """
    hosts = (joined + ",").replace("/32,", ",")
    if "/" in hosts:
        return False
    from _socket import AF_INET, inet_pton  # only for long lists; the apply path imports it anyway

    try:
        return all(map(inet_pton, repeat(AF_INET), hosts[:-1].split(",")))  # 4 bytes each: never false
    except (OSError, ValueError):  # not an address; a NUL in it
        return False


def parse_cidrs(items: list[str]) -> list[Cidr]:
    """`parse_cidr` of each item; ValueError names none (the caller finds the bad one).

    A long -x list is typically thousands of IPv4 host addresses: one check
    over the whole list validates them, and each becomes its Cidr without a
    per-item parse (docs/performance.md, "What start-up avoids").
    """
    if len(items) > 16:
        joined = ",".join(items)
        if _ipv4_host_list(items, joined):
            if joined.count("/") == len(items) and ",127." not in f",{joined}":  # all a.b.c.d/32, none loopback
                # tuple.__new__ over zipped fields: a loop in C, not the generated __new__'s Python call per item
                return list(map(tuple.__new__, repeat(Cidr), zip(items, repeat(4), repeat(False))))
            return [Cidr(item if item.endswith("/32") else f"{item}/32", 4, item.startswith("127."))
                    for item in items]
    return [parse_cidr(item) for item in items]


def parse_cidr(text: str) -> Cidr:
    """`text` as a Cidr, or ValueError. A bare address is a host route (/32, /128).

    The common IPv4 form is parsed here, without `ipaddress` (docs/performance.md, "What start-up avoids").
    Everything else (IPv6, netmask notation) is left to `ipaddress`, which
    decides what is valid.
    """
    simple = _simple_ipv4_cidr(text)
    if simple:
        (a, b, c, d), prefix = simple
        if prefix is None or prefix == "32":  # a host: already its network form
            return Cidr(text if prefix else f"{text}/32", 4, a == "127")
        bits = int(prefix)
        address = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        value = address & (0xFFFFFFFF << (32 - bits))
        if value == address:  # already network form (the octets match no leading zeros): keep the text
            return Cidr(text if prefix is not None else f"{text}/32", 4, a == "127" and bits >= 8)
        network = ".".join(str(value >> shift & 0xFF) for shift in (24, 16, 8, 0))
        return Cidr(f"{network}/{bits}", 4, a == "127" and bits >= 8)
    import ipaddress

    parsed = ipaddress.ip_network(text, strict=False)
    return Cidr(str(parsed), parsed.version, parsed.is_loopback)

REDIRECT = "REDIRECT"
TPROXY = "TPROXY"
WILDCARD = "*"
BACKENDS = ("auto", "libiptc", "legacy", "nft")

# Characters that mean something to a shell or to iptables' own parser. No
# legitimate value of any flag contains one, and rejecting them everywhere means
# nothing a pod spec says can be smuggled into a restore file or a log line.
_FORBIDDEN = ";&|$`<>(){}[]\\'\"!?~#\x7f" + "".join(map(chr, range(0x20)))
_FORBIDDEN_BYTES = _FORBIDDEN.encode()  # all ASCII: a UTF-8 encoded value holds one only as itself
_DURATION_UNITS_IN_ORDER = ("ns", "us", "µs", "μs", "ms", "s", "m", "h")  # the first that fits is the unit
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Bounds on what a value may be, so that every accepted value is one the kernel
# and every backend can represent and every refusal is one readable line.
# A value longer than one exec argument may be (MAX_ARG_STRLEN) cannot come from
# a pod spec anyway; numbers are ASCII digits, at most as many as uint32 needs.
_MAX_VALUE_CHARS = 131072
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_decimal(text: str) -> bool:
    """1-10 ASCII digits."""
    return 0 < len(text) <= 10 and text.isascii() and text.isdigit()


def _is_hex(text: str, most: int | None = 8) -> bool:
    """`0x` or `0X` and 1 to `most` hex digits (None: any number)."""
    digits = text[2:]
    return (text[:2] in ("0x", "0X") and 0 < len(digits) <= (most or len(digits))
            and _HEX_DIGITS.issuperset(digits))


def _is_plain_number(text: str) -> bool:
    """ASCII digits with an optional fraction (`5`, `2.5`): a duration without a unit."""
    whole, dot, fraction = text.partition(".")
    return _is_digits(whole) and (not dot or _is_digits(fraction))


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _duration_parts(text: str) -> list[tuple[str, str]] | None:
    """`1m30s` as [("1", "m"), ("30", "s")]: numbers (`5`, `5.`, `.5`, `2.5`) each with a unit; None if not."""
    parts = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and "0" <= text[j] <= "9":
            j += 1
        if text.startswith(".", j):
            k = j + 1
            while k < len(text) and "0" <= text[k] <= "9":
                k += 1
            if j == i and k == j + 1:  # a dot alone
                return None
            j = k
        if j == i:
            return None
        unit = next((u for u in _DURATION_UNITS_IN_ORDER if text.startswith(u, j)), None)
        if unit is None:
            return None
        parts.append((text[i:j], unit))
        i = j + len(unit)
    return parts
_MAX_DURATION_CHARS = 64
_MAX_PROBE_SECONDS = 3600.0
_PATH_MAX, _NAME_MAX = 4095, 255
_SHOWN_CHARS = 60
# Route tables the kernel uses itself: a `local default` route in one of them
# would swallow every packet of the pod.
_RESERVED_ROUTE_TABLES = {0, 253, 254, 255}


class FlagSpec(NamedTuple):
    """One command-line flag: its names, environment fallback, default, help and per-flag facts.

    `releases` is the range of Istio minor releases whose istio-iptables had
    the flag (istio-init's own flags: every release a rule set covers); a flag
    is accepted under a rule set whose releases overlap it, and is an error
    naming those releases under any other. A row is declared with its Config
    field (`flag`, in the Config class), so adding a flag is that one
    statement plus the rule-set code that reads the field.
    """

    dest: str
    short: str | None
    long: str
    env: str | None
    default: str
    help: str
    is_switch: bool = False
    releases: tuple[int, int] = (8, 32)
    # No command-line flag: the setting is read from `env` only.
    env_only: bool = False
    # A second variable for the same setting that wins over `env` (current rule set only).
    env_alias: str | None = None
    # The releases whose runs read `env` when the flag itself exists more widely (None: as `releases`).
    env_releases: tuple[int, int] | None = None
    # Accepted for compatibility and validated, but changes no rule (Istio's own switches for its tools).
    no_effect: bool = False
    # The _Parser method that turns the raw text into the value of `field`.
    parser: str = "switch"
    # The Config field it fills, the one it is declared with ("": validated only).
    field: str = ""
    # Its value can appear in rules it writes into built-in chains (PREROUTING, OUTPUT, ...): the rule
    # sets' ownership shapes are planned with a sentinel in its place (rulesets/sentinels.py).
    builtin: bool = False
    # Non-ASCII characters its value may hold: "" none, "*" any, else just these.
    non_ascii: str = ""
    # Why the CNI plugin refuses it ("": the plugin's args may set it).
    cni_refusal: str = ""
    # The `clean` command takes it too (where to clean, with what, and what is istio-init's).
    for_clean: bool = False

    @property
    def label(self) -> str:
        """How error messages name the flag: `-p/--envoy-port` (a variable: its name)."""
        if self.env_only:
            return str(self.env)
        return f"-{self.short}/--{self.long}" if self.short else f"--{self.long}"

    @property
    def option_names(self) -> tuple[str, ...]:
        """The words that give it on a command line, `-p` and `--envoy-port` (none: a variable only)."""
        if self.env_only:
            return ()
        return (f"-{self.short}", f"--{self.long}") if self.short else (f"--{self.long}",)

    def exists_in(self, rule_set: str) -> bool:
        return _overlap(self.releases, RULE_SET_RELEASES[rule_set])

    def env_read_in(self, rule_set: str) -> bool:
        return _overlap(self.env_releases or self.releases, RULE_SET_RELEASES[rule_set])


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


RULES_1_8 = "1.8"
RULES_CURRENT = "current"
# Each rule set (named by its first release; `current` for 1.25 on) and the Istio minor releases it covers.
RULE_SET_RELEASES: dict[str, tuple[int, int]] = {
    RULES_1_8: (8, 8), "1.9": (9, 10), "1.11": (11, 11), "1.12": (12, 12), "1.13": (13, 17), "1.18": (18, 19),
    "1.20": (20, 22), "1.23": (23, 23), "1.24": (24, 24), RULES_CURRENT: (25, 32),
}
SUPPORTED_RULES_VERSIONS = "an Istio version 1.8 to 1.32 (such as 1.20 or 1.20.3), or current (= 1.25 to 1.32)"


def rule_set_of_release(minor: int) -> str | None:
    """The rule set that writes what Istio 1.`minor` writes (None: no such release)."""
    for name, (first, last) in RULE_SET_RELEASES.items():
        if first <= minor <= last:
            return name
    return None


def releases_text(releases: tuple[int, int]) -> str:
    """`1.11-1.32`, or `1.8` for one release."""
    first, last = releases
    return f"1.{first}" if first == last else f"1.{first}-1.{last}"


def rule_sets_text(releases: tuple[int, int]) -> str:
    """The --rules-version values that cover `releases`: `1.11 to current`, `current`, `1.8`."""
    names = [name for name, covered in RULE_SET_RELEASES.items() if _overlap(releases, covered)]
    return names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"


MAX_OWNER_GROUPS_INCLUDE = 64  # Istio's limit: the include list becomes one rule of N owner matches
DEFAULT_IPV4_LOOPBACK_CIDR = "127.0.0.1/32"

# Istio's init container runs `istio-iptables FLAGS...`: both front doors drop that first word.
ISTIO_BINARY_NAME = "istio-iptables"
# Current Istio's --cleanup-only, given by environment (the click CLI reads and checks it).
CLEANUP_ONLY_ENV = "CLEANUP_ONLY"

# The Istio releases (1.N) whose injection template writes each of pilot-agent's logging flags (logs.py)
# into the init container's args.
INJECTED_BY = {"--log_output_level": (15, 32), "--log_as_json": (15, 32)}

# How a switch is spelled: Istio's flags and variables, and CLEANUP_ONLY (case and surrounding
# spaces aside); Go's strconv.ParseBool for pilot-agent's logging flags (case aside) and for pod
# annotations and proxy metadata (exactly).
SWITCH_WORDS = (("1", "true", "yes", "on"), ("", "0", "false", "no", "off"))
GO_SWITCH_WORDS = (("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False"))


def switch_value(text: str, words: tuple[tuple[str, ...], tuple[str, ...]] = SWITCH_WORDS,
                 exact: bool = False) -> bool | None:
    """True or False for a spelling in `words` (true ones, false ones); None for anything else.

    Unless `exact`, surrounding spaces and case do not count.
    """
    key = text if exact else text.strip().lower()
    if key in words[0]:
        return True
    if key in words[1]:
        return False
    return None

Value = TypeVar("Value")


def flag(value: Value, short: str | None, long: str, env: str | None, help: str, *, dest: str = "",
         text: str | None = None, **facts: Any) -> Value:
    """A Config field declared as a flag: `value` is the field's default, the rest its row (FlagSpec).

    The row's dest is the field's name unless `dest` names it otherwise; the
    default's spelling on a command line is `value`'s own (true/false,
    digits, a comma list, '*') unless `text` gives it. For mypy the call is
    the default; at run time it is a records.Declared, whose row the class
    keeps (records.declarations) and FLAGS lists.
    """
    def row(field: str) -> FlagSpec:
        return FlagSpec(dest or field, short, long, env, _spelled(value) if text is None else text, help,
                        field=field, **facts)

    return Declared(value, row)  # type: ignore[return-value]  # records.py makes `value` the field's default


def _spelled(value: object) -> str:
    """A typed default as its flag spells it: `false`, `15001`, `1337,1338`, `*`, `` (empty)."""
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is tuple:
        return ",".join(map(str, value))
    return str(value)


class Config(NamedTuple):
    """Everything the planner and backends need, validated and normalised; each field with its flag row.

    A NamedTuple, as the model's types are, for its start-up cost (see model.py).
    Rows whose `releases` are narrower than istio-init's own (8, 32) are Istio's
    later or earlier flags.
    """

    rules_version: str = flag(
        RULES_1_8, None, "rules-version", "ISTIO_INIT_RULES_VERSION",
        "Which Istio release's rules to install: its version (1.8 to 1.32, such as 1.20 or 1.20.3), "
        "or current (1.25 to 1.32). Default 1.8; docs/compatibility.md lists the rule sets.",
        parser='rule_set')
    envoy_port: int = flag(
        15001, "p", "envoy-port", "ENVOY_PORT",
        "Port the sidecar listens on for captured outbound TCP (env read by the 1.8 rule set only).",
        env_releases=(8, 8), parser='port')
    inbound_capture_port: int = flag(
        15006, "z", "inbound-capture-port", "INBOUND_CAPTURE_PORT",
        "Port the sidecar listens on for captured inbound TCP.",
        parser='port')
    inbound_tunnel_port: int = flag(
        15008, "e", "inbound-tunnel-port", "INBOUND_TUNNEL_PORT",
        "Inbound tunnel port; never captured.",
        parser='port')
    proxy_uids: tuple[int, ...] = flag(
        (1337,), "u", "proxy-uid", "PROXY_UID",
        "Comma list of uids the proxy runs as; their traffic is never captured. "
        "Default: uid of user $ENVOY_USER (istio-proxy), else 1337.",
        dest='proxy_uid', text='', parser='id_list', builtin=True)
    proxy_gids: tuple[int, ...] = flag(
        (1337,), "g", "proxy-gid", "PROXY_GID",
        "Comma list of gids the proxy runs as. Default: the -u value.",
        dest='proxy_gid', text='', parser='id_list', builtin=True)
    inbound_interception_mode: str = flag(
        REDIRECT, "m", "istio-inbound-interception-mode", "ISTIO_INBOUND_INTERCEPTION_MODE",
        "How inbound TCP reaches the proxy: REDIRECT (nat) or TPROXY (mangle, keeps the "
        "original source address).",
        parser='mode', builtin=True)
    inbound_ports: AllOrList[int] = flag(
        NOTHING, "b", "istio-inbound-ports", "ISTIO_INBOUND_PORTS",
        "Inbound ports to capture: '*' for all, or a comma list. Empty: no inbound capture.",
        parser='ports_or_all')
    local_exclude_ports: tuple[int, ...] = flag(
        (), "d", "istio-local-exclude-ports", "ISTIO_LOCAL_EXCLUDE_PORTS",
        "Comma list of inbound ports left alone when -b is '*'. Port 22 always is, up to Istio 1.12.",
        parser='ports')
    outbound_cidrs: AllOrList[Cidr] = flag(
        NOTHING, "i", "istio-service-cidr", "ISTIO_SERVICE_CIDR",
        "Outbound destinations to capture: '*' for all, or a comma list of CIDRs (IPv4 and "
        "IPv6 may be mixed). Empty: no outbound capture.",
        dest='service_cidr', parser='cidrs_or_all')
    exclude_cidrs: tuple[Cidr, ...] = flag(
        (), "x", "istio-service-exclude-cidr", "ISTIO_SERVICE_EXCLUDE_CIDR",
        "Comma list of CIDRs never captured outbound. '*' is not allowed.",
        dest='service_exclude_cidr', parser='cidrs')
    outbound_ports: tuple[int, ...] = flag(
        (), "q", "istio-outbound-ports", "ISTIO_OUTBOUND_PORTS",
        "Comma list of outbound ports always captured, whatever -i says (IPv4 only in Istio 1.8).",
        parser='ports')
    outbound_ports_exclude: tuple[int, ...] = flag(
        (), "o", "istio-local-outbound-ports-exclude", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        "Comma list of outbound ports never captured.",
        parser='ports')
    kube_virt_interfaces: tuple[str, ...] = flag(
        (), "k", "kube-virt-interfaces", "KUBE_VIRT_INTERFACES",
        "Comma list of interfaces (KubeVirt VMs) whose inbound traffic is treated as outbound.",
        parser='interfaces', builtin=True, non_ascii='*')
    tproxy_mark: int = flag(
        1337, "t", "istio-inbound-tproxy-mark", "ISTIO_INBOUND_TPROXY_MARK",
        "Firewall mark set on TPROXY-captured packets (decimal or 0x hex).",
        parser='uint32', builtin=True, for_clean=True)
    tproxy_route_table: int = flag(
        133, "r", "istio-inbound-tproxy-route-table", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        "Policy-routing table that delivers TPROXY-marked packets locally.",
        parser='route_table', for_clean=True)
    iptables_probe_port: int = flag(
        15002, None, "iptables-probe-port", "IPTABLES_PROBE_PORT",
        "Port of the local listener --run-validation connects through.",
        parser='port')
    probe_timeout: float = flag(
        5.0, None, "probe-timeout", "PROBE_TIMEOUT",
        "How long --run-validation waits, as a duration such as 5s or 500ms.",
        text='5s', parser='duration', non_ascii='µμ')
    iptables_backend: str = flag(
        "auto", None, "iptables-backend", "ISTIO_IPTABLES_BACKEND",
        "How rules reach the kernel: libiptc, legacy or nft (iptables-restore), or auto.",
        parser='backend', for_clean=True)
    network_namespace: str | None = flag(
        None, None, "network-namespace", "NETWORK_NAMESPACE",
        "Apply in this network namespace (a name under /run/netns or a path such as "
        "/proc/PID/ns/net) instead of the current one.",
        text='', parser='namespace', non_ascii='*', cni_refusal='the runtime gives CNI_NETNS', for_clean=True)
    ipv6: bool | None = flag(  # None: decided from the pod's addresses
        None, None, "ipv6", "ISTIO_IPV6",
        "Make IPv6 rules: auto (when the pod's first address is IPv6), true or false.",
        text='auto', parser='tristate')
    dry_run: bool = flag(
        False, "n", "dry-run", "DRY_RUN",
        "Print the rules in iptables-save form and change nothing.",
        is_switch=True, cni_refusal='the runtime wants the rules applied', for_clean=True)
    skip_rule_apply: bool = flag(
        False, None, "skip-rule-apply", "SKIP_RULE_APPLY",
        "Do not apply any rules (useful with --run-validation).",
        is_switch=True, cni_refusal='the runtime wants the rules applied')
    run_validation: bool = flag(
        False, None, "run-validation", "RUN_VALIDATION",
        "After applying, prove an outbound connection is redirected; exit 126 if not.",
        is_switch=True, cni_refusal="run it in the pod's validation init container")
    dns_capture: bool = flag(
        False, None, "redirect-dns", "REDIRECT_DNS",
        "Capture DNS (UDP and TCP port 53) to port 15053. Also on when "
        "ISTIO_META_DNS_CAPTURE=true.",
        dest='redirect_dns', is_switch=True, parser='dns', builtin=True)
    multiport: bool = flag(
        False, None, "multiport", "ISTIO_MULTIPORT",
        "Group port lists into '-m multiport' rules of up to 15 ports (not Istio's rule "
        "set; fewer rules for long lists; 1.8 rule set only).",
        is_switch=True, releases=(8, 8))
    # Istio's later flags: `releases` says since (and until) which release.
    exclude_interfaces: tuple[str, ...] = flag(
        (), "c", "istio-exclude-interfaces", "ISTIO_EXCLUDE_INTERFACES",
        "Comma list of interfaces whose traffic is never captured, in or out (Istio 1.11 on).",
        releases=(11, 32), parser='interfaces', builtin=True)
    capture_all_dns: bool = flag(
        False, None, "capture-all-dns", "CAPTURE_ALL_DNS",
        "With DNS capture, capture all port-53 traffic, not only to the resolvers of "
        "/etc/resolv.conf (Istio 1.11 on).",
        is_switch=True, releases=(11, 32), builtin=True)
    drop_invalid: bool = flag(
        False, None, "drop-invalid", "DROP_INVALID",
        "Drop packets conntrack finds INVALID (in mangle; Istio 1.12 on). "
        "Also INVALID_DROP, which wins (current rule set).",
        is_switch=True, releases=(12, 32), env_alias="INVALID_DROP", builtin=True)
    dual_stack: bool = flag(
        False, None, "dual-stack", "DUAL_STACK",
        "With --ipv6 auto, make IPv6 rules when the pod has any IPv6 address (Istio 1.18 on). "
        "Also ISTIO_DUAL_STACK, which wins (current rule set).",
        is_switch=True, releases=(18, 32), env_alias="ISTIO_DUAL_STACK")
    cni_mode: bool = flag(
        False, None, "cni-mode", "CNI_MODE",
        "Run from the host for a pod: the xtables lock is scoped to --network-namespace "
        "(Istio 1.11 on).",
        is_switch=True, releases=(11, 32))
    reconcile: bool = flag(
        False, None, "reconcile", "RECONCILE",
        "Accepted for Istio compatibility: istio-init always converges (Istio 1.24 on).",
        is_switch=True, releases=(24, 32))
    force_apply: bool = flag(
        False, None, "force-apply", "FORCE_APPLY",
        "Accepted for Istio compatibility: every run converges to the planned rules "
        "(Istio 1.24 on).",
        is_switch=True, releases=(24, 32))
    owner_groups_include: AllOrList[int] = flag(
        EVERYTHING, None, "", "ISTIO_OUTBOUND_OWNER_GROUPS",
        "Groups (names or gids) whose outbound traffic is captured; '*' for all; at most 64 (Istio 1.14 on).",
        releases=(14, 32), env_only=True, parser='groups_or_all')
    owner_groups_exclude: tuple[int, ...] = flag(
        (), None, "", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "Groups (names or gids) whose outbound traffic is never captured (with the include list '*'; "
        "Istio 1.14 on).",
        releases=(14, 32), env_only=True, parser='groups')
    ipv4_loopback_cidr: str = flag(
        DEFAULT_IPV4_LOOPBACK_CIDR, None, "", "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "The IPv4 loopback CIDR of the rules (instead of 127.0.0.1/32): IPv4 loopback, mask 8-32 "
        "(Istio 1.21 on).",
        releases=(21, 32), env_only=True, parser='loopback_cidr', builtin=True)
    native_nftables: bool = flag(
        False, None, "native-nftables", "NATIVE_NFTABLES",
        "Program the rules with native nftables (tables inet istio-proxy-nat, -mangle, -raw) in one "
        "transaction instead of iptables; with -n, print that transaction.",
        is_switch=True, for_clean=True)
    agent_dual_stack: bool = flag(
        False, None, "", "ISTIO_AGENT_DUAL_STACK",
        "With --ipv6 auto, make IPv6 rules when the pod has any IPv6 address (Istio 1.17-1.18's "
        "pilot-agent variable).",
        releases=(17, 18), env_only=True)
    trace_logging: bool = flag(
        False, None, "iptables-trace-logging", "IPTABLES_TRACE_LOGGING",
        "Log the first packet of each captured connection with NFLOG (group 1337; Istio 1.12-1.24). "
        "Istio 1.25 takes it and writes no NFLOG rule.",
        is_switch=True, releases=(12, 25), builtin=True)
    dns_conntrack_zone: bool = flag(
        False, None, "", "ISTIO_META_DNS_CONNTRACK_ZONE",
        "With DNS capture, keep DNS in conntrack zones of its own (Istio 1.10; always from 1.11).",
        releases=(10, 10), env_only=True, builtin=True)
    # Where each value came from, for the effective-configuration summary.
    sources: Mapping[str, str] = MappingProxyType({})

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == TPROXY

    @property
    def inbound_enabled(self) -> bool:
        return bool(self.inbound_ports)



# Flags that are validated but fill no Config field.
VALIDATED_ONLY = (
    FlagSpec("force_iptables_binary", None, "force-iptables-binary", "FORCE_IPTABLES_BINARY", "",
             "legacy or nft: skip backend detection, as --iptables-backend legacy|nft (current rule set).",
             releases=(25, 32),
             parser='checked_by_backend'),
    FlagSpec("restore_format", "f", "restore-format", None, "true",
             "Accepted for Istio compatibility (Istio up to 1.23): istio-init picks its own way to apply.",
             is_switch=True, releases=(8, 23), no_effect=True),
    FlagSpec("iptables_version", None, "iptables-version", None, "",
             "Accepted for Istio compatibility (Istio 1.18-1.21): see --iptables-backend.",
             releases=(18, 21), no_effect=True,
             parser='text'),
    FlagSpec("output_paths", None, "output-paths", None, "",
             "Accepted for Istio compatibility (Istio 1.11-1.16): istio-init logs to stderr.",
             releases=(11, 16), no_effect=True,
             parser='text'),
    FlagSpec("host_nsenter_exec", None, "host-nsenter-exec", None, "false",
             "Accepted for Istio compatibility (Istio 1.15-1.17): see --network-namespace.",
             is_switch=True, releases=(15, 17), no_effect=True),
)

FLAGS: tuple[FlagSpec, ...] = (
    *(spec for spec in declarations(Config).values() if isinstance(spec, FlagSpec)), *VALIDATED_ONLY)
FLAGS_BY_DEST = {spec.dest: spec for spec in FLAGS}
_OPTION_WORDS: dict[str, FlagSpec] = {}


def option_words() -> dict[str, FlagSpec]:
    """Each word that gives a flag on a command line (`-p`, `--envoy-port`) -> its row: the rows' grammar.

    Both front doors read flags through it: cli.py makes each row's click
    option from the same `option_names`, entry.py reads Istio's plain flag
    list with this map, and `take_switch_values` finds the switches in it.
    Built on first use (the CNI plugin's runs never need it).
    """
    if not _OPTION_WORDS:
        _OPTION_WORDS.update((name, spec) for spec in FLAGS for name in spec.option_names)
    return _OPTION_WORDS
# Go's strconv.ParseBool, which Istio's (cobra/pflag) boolean flags use for `--flag=VALUE`.
GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def take_switch_values(args: Sequence[str], extra_switches: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """`--switch=VALUE` words taken out of `args`, as Istio's boolean flags accept them.

    The one grammar both front doors use: every switch of the flag rows (and
    the `extra_switches`, long names of the click-only ones) takes `=true` or
    `=false` in Go's spellings. Returns the other words and dest -> "true" /
    "false"; a `false` given this way is given (it beats the variable), as in
    Istio. A click-only switch set to true comes back as its bare `--name`.
    """
    words = option_words()
    rest: list[str] = []
    values: dict[str, str] = {}
    for word in args:
        name, eq, value = word.partition("=")
        spec = words.get(name) if eq and name.startswith("--") else None
        switch = spec if spec is not None and spec.is_switch else None
        if switch is not None or (eq and name.startswith("--") and name[2:] in extra_switches):
            if value not in GO_TRUE and value not in GO_FALSE:
                raise ConfigError(switch.label if switch else name, value, "must be true or false")
            if switch is not None:
                values[switch.dest] = "true" if value in GO_TRUE else "false"
            elif value in GO_TRUE:
                rest.append(name)
            continue
        rest.append(word)
    return rest, values


def default_proxy_uid(environ: Mapping[str, str]) -> str:
    """Istio's default: the uid of $ENVOY_USER (istio-proxy), else 1337."""
    import pwd

    try:
        return str(pwd.getpwnam(environ.get("ENVOY_USER") or "istio-proxy").pw_uid)
    except (KeyError, ValueError):  # ValueError: a name with a NUL or a lone surrogate
        return "1337"


def from_sources(given: Mapping[str, str | bool | None], environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config: command line beats environment beats default.

    `given` maps a flag's dest to the raw value typed on the command line, or
    None when the flag was not given. Raises ConfigError on the first bad value.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    version = _rules_version(given, environ)
    for spec in FLAGS:
        value = given.get(spec.dest)
        reads_env = spec.env_read_in(version)
        if value is not None and value is not False:
            if not spec.exists_in(version):
                raise ConfigError(spec.label, "true" if value is True else str(value), not_in_rule_set(spec, version))
            raw[spec.dest] = "true" if value is True else str(value)
            sources[spec.dest] = "flag"
        elif reads_env and version == RULES_CURRENT and spec.env_alias and environ.get(spec.env_alias) is not None:
            raw[spec.dest] = environ[spec.env_alias]
            sources[spec.dest] = spec.env_alias
        elif reads_env and spec.env and environ.get(spec.env) is not None:
            raw[spec.dest] = environ[spec.env]
            sources[spec.dest] = spec.env
        else:
            raw[spec.dest] = spec.default
            sources[spec.dest] = "default"
    if sources["proxy_uid"] == "default":
        raw["proxy_uid"] = default_proxy_uid(environ)
    if sources["proxy_gid"] == "default":
        raw["proxy_gid"] = raw["proxy_uid"]
        sources["proxy_gid"] = "-u"

    parse = _RowParser(raw, sources, version, environ)
    for spec in FLAGS:
        if sources[spec.dest] != "default":  # a default is its row's own text (tests/test_flag_rows.py checks each)
            parse.check_characters(spec)
    # Each row's parser fills its Config field; a flag this rule set does not have keeps the default.
    fields: dict[str, Any] = {}
    for spec in FLAGS:
        if spec.exists_in(version):
            value = getattr(parse, spec.parser)(spec.dest)
            if spec.field:
                fields[spec.field] = value
    return Config(sources=sources, **fields)


DNS_CAPTURE_ALIAS = "ISTIO_META_DNS_CAPTURE"


def cni_refusals() -> dict[str, str]:
    """dest -> how the CNI plugin names a flag its args may not set, and why (from the rows)."""
    return {spec.dest: f"{spec.label} ({spec.cni_refusal})" for spec in FLAGS if spec.cni_refusal}


def fields_not_in(rule_set: str) -> frozenset[str]:
    """Config fields of flags the rule set does not have (left out of its summary)."""
    return frozenset(spec.field for spec in FLAGS if spec.field and not spec.exists_in(rule_set))


def _rules_version(given: Mapping[str, str | bool | None], environ: Mapping[str, str]) -> str:
    """The rule set's name (`1.8` ... `current`), decided first: it says which flags exist."""
    spec = FLAGS_BY_DEST["rules_version"]
    text, source = given.get("rules_version"), "flag"
    if text is None:
        text, source = environ.get(str(spec.env)), str(spec.env)
    if text is None:
        return RULES_1_8
    value = str(text).strip()
    if value == RULES_CURRENT:
        return RULES_CURRENT
    major, _, rest = value.partition(".")
    minor, dot, patch = rest.partition(".")
    patch_ok = not dot or (_is_digits(patch) and len(patch) <= 4)  # 1.N and 1.N.P, as Istio's tags
    known = major == "1" and _is_digits(minor) and minor == str(int(minor)) and patch_ok  # no `1.08`
    rule_set = rule_set_of_release(int(minor)) if known else None
    if rule_set is None:
        label = spec.label if source == "flag" else f"{spec.label} (from {source})"
        raise ConfigError(label, value, f"supported: {SUPPORTED_RULES_VERSIONS}")
    return rule_set


def not_in_rule_set(spec: FlagSpec, version: str) -> str:
    """Why a flag of other releases is refused: the releases that have it and how to select them."""
    covered = RULE_SET_RELEASES[version]
    uses = version
    if covered[0] != covered[1] and version != RULES_CURRENT:
        uses += f", for Istio {releases_text(covered)}"
    return (f"exists only with --rules-version {rule_sets_text(spec.releases)} (Istio "
            f"{releases_text(spec.releases)}; this run uses {uses})")


def ignored_environment(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per variable set in the environment that this run's rule set does not read.

    Never silently ignored: a mesh that sets INVALID_DROP for current Istio and
    runs the 1.8 rule set must be told its setting has no effect.
    """
    environ = os.environ if environ is None else environ
    warnings = []
    for spec in FLAGS:
        for name, read in ((spec.env, spec.env_read_in(config.rules_version)),
                           (spec.env_alias, config.rules_version == RULES_CURRENT)):
            if name and not read and environ.get(name) is not None:
                releases = (25, 32) if name == spec.env_alias else spec.env_releases or spec.releases
                warnings.append(f"warning: {name} is read only with --rules-version {rule_sets_text(releases)}; "
                                f"ignored (this run uses {config.rules_version})")
    return warnings


def unwritten_flags(given: Sequence[str], rule_set: str) -> list[str]:
    """One warning line when the args hold pilot-agent flags the rule set's releases never wrote.

    Current Istio's injected args (`--log_output_level=...`) under the 1.8
    default mean a mesh of a later release runs 1.8's rules: said once, with
    the releases that write the flag and the --rules-version values for them.
    """
    covered = RULE_SET_RELEASES[rule_set]
    flags = [flag for flag in dict.fromkeys(given)
             if flag in INJECTED_BY and not _overlap(INJECTED_BY[flag], covered)]
    if not flags:
        return []
    releases = (min(INJECTED_BY[f][0] for f in flags), max(INJECTED_BY[f][1] for f in flags))
    return [f"warning: {' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} in the init container args of "
            f"Istio {releases_text(releases)} (their rules: --rules-version {rule_sets_text(releases)}); this run "
            f"installs Istio {releases_text(covered)}'s rules (--rules-version {rule_set})"]


class _Parser:
    """Turns one raw string per flag into typed values, failing with the flag's name."""

    def __init__(self, raw: dict[str, str], sources: dict[str, str], version: str = RULES_1_8,
                 environ: Mapping[str, str] | None = None) -> None:
        self.raw = raw
        self.sources = sources
        self.version = version
        self.environ = {} if environ is None else environ

    def fail(self, dest: str, value: str, reason: str) -> ConfigError:
        if len(value) > _SHOWN_CHARS:  # the one line stays readable for a 5,000-digit value
            value = f"{value[:_SHOWN_CHARS]}... ({len(value)} characters)"
        return ConfigError(flag_label(dest, self.sources), value, reason)

    def check_characters(self, spec: FlagSpec) -> None:
        dest = spec.dest
        value = self.raw[dest]
        if len(value) > _MAX_VALUE_CHARS:
            raise self.fail(dest, value, f"longer than {_MAX_VALUE_CHARS} characters")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(dest, value, "not valid UTF-8") from None
        if len(encoded.translate(None, _FORBIDDEN_BYTES)) != len(encoded):  # one C pass over up to 128 KiB
            bad = next(c for c in value if c in _FORBIDDEN)
            raise self.fail(dest, value, f"character {bad!r} is not allowed")
        if value.isascii():  # one C scan: a -x list is up to 128 KiB, a loop over it costs milliseconds
            return
        if spec.non_ascii == "*":
            return
        if spec.non_ascii:
            value = "".join(c for c in value if c not in spec.non_ascii)
        bad_char = next((c for c in value if not c.isascii()), None)
        if bad_char is not None:
            raise self.fail(dest, self.raw[dest], f"character {bad_char!r} is not ASCII")

    def items(self, dest: str) -> list[str]:
        """Comma list items, whitespace-trimmed; empty items are skipped as in Istio."""
        value = self.raw[dest]
        if " " not in value:  # the usual spelling: nothing to trim in any of (up to 8,000) items
            return [item for item in value.split(",") if item]
        return [item.strip(" ") for item in value.split(",") if item.strip(" ")]

    def _decimal(self, dest: str, text: str, what: str, maximum: int, range_text: str) -> int:
        """ASCII digits only, at most 10 (no int() of a 5,000-digit string), up to `maximum`."""
        if not text.isascii() or not text.isdigit():
            raise self.fail(dest, text, f"not a {what}")
        if not _is_decimal(text) or int(text) > maximum:
            raise self.fail(dest, text, f"{what} out of range {range_text}")
        return int(text)

    def _port_value(self, dest: str, text: str) -> int:
        return self._decimal(dest, text, "port number", 65535, "0-65535")

    def port(self, dest: str) -> int:
        return self._port_value(dest, self.raw[dest].strip())

    def port_list(self, dest: str, wildcard: bool) -> AllOrList[int]:
        if self.raw[dest].strip() == WILDCARD:
            if not wildcard:
                raise self.fail(dest, self.raw[dest], "'*' is not allowed here; give a list of ports")
            return EVERYTHING
        return AllOrList(False, tuple(self._port_value(dest, item) for item in self.items(dest)))

    def cidr_list(self, dest: str, wildcard: bool, need_prefix: bool = False) -> AllOrList[Cidr]:
        if self.raw[dest].strip() == WILDCARD:
            if not wildcard:
                raise self.fail(dest, self.raw[dest], "'*' is not allowed here; give a list of CIDRs")
            return EVERYTHING
        items = self.items(dest)
        for item in items if need_prefix else ():
            if "/" not in item:
                raise self.fail(dest, item, "a CIDR needs a prefix length, such as /32")
        try:
            return AllOrList(False, tuple(parse_cidrs(items)))
        except ValueError:
            pass
        for item in items:  # name the first bad item
            try:
                parse_cidr(item)
            except ValueError:
                raise self.fail(dest, item, "not a valid IPv4 or IPv6 CIDR") from None
        raise AssertionError("parse_cidrs and parse_cidr disagree")

    def id_list(self, dest: str) -> tuple[int, ...]:
        ids = []
        for item in self.items(dest):
            if not _is_decimal(item) or int(item) > 0xFFFFFFFE:
                raise self.fail(dest, item, "not a numeric id")
            ids.append(int(item))
        if not ids:
            raise self.fail(dest, self.raw[dest], "at least one numeric id is needed")
        return tuple(ids)

    def group_list(self, dest: str, wildcard: bool) -> AllOrList[int]:
        """Group names or gids as gids (iptables-save prints gids); `*` is every group."""
        if self.raw[dest].strip() == WILDCARD:
            if not wildcard:
                raise self.fail(dest, self.raw[dest], "'*' is not allowed here; give a list of groups")
            return EVERYTHING
        gids = []
        for item in self.items(dest):
            if item.isascii() and item.isdigit():
                if len(item) > 10 or int(item) > 0xFFFFFFFE:
                    raise self.fail(dest, item, "not a valid gid")
                gids.append(int(item))
                continue
            import grp

            try:
                gids.append(grp.getgrnam(item).gr_gid)
            except KeyError:
                raise self.fail(dest, item, "no such group") from None
        if wildcard and not gids:
            return EVERYTHING  # an empty include list is Istio's default '*'
        return AllOrList(False, tuple(gids))

    def loopback_cidr(self, dest: str) -> str:
        text = self.raw[dest].strip()
        try:
            cidr = parse_cidr(text) if "/" in text else None
        except ValueError:
            cidr = None
        if cidr is None or cidr.version != 4:
            raise self.fail(dest, text, "not an IPv4 CIDR with a prefix length")
        bits = int(cidr.text.split("/")[1])
        if not cidr.text.startswith("127.") or not 8 <= bits <= 32:
            raise self.fail(dest, text, "must be IPv4 loopback (127.0.0.0/8) with a mask of 8 to 32")
        return cidr.text

    def interfaces(self, dest: str) -> tuple[str, ...]:
        names = self.items(dest)
        if not names:
            return ()
        from istio_init import ifnames  # only for given names: pods rarely name interfaces (-k, -c)

        backend = self.raw["iptables_backend"].strip().lower()
        if switch_value(self.raw.get("native_nftables", "")):
            backend = ifnames.NATIVE_NFTABLES  # nft writes the names, whichever iptables backend is named
        for name in names:
            refusal = (ifnames.kernel_refusal(name) or ifnames.common_refusal(name)
                       or ifnames.backend_refusal(name, backend))
            if refusal:
                raise self.fail(dest, name, refusal)
        return tuple(names)

    def uint32(self, dest: str) -> int:
        text = self.raw[dest].strip(" ")
        if _is_hex(text):
            value = int(text, 16)
        elif _is_decimal(text):
            value = int(text, 10)
        elif text.isascii() and (text.isdigit() or _is_hex(text, None)):
            raise self.fail(dest, text, "must be between 1 and 4294967295")
        else:
            raise self.fail(dest, text, "not a number (decimal or 0x hex)")
        if not 0 < value <= 0xFFFFFFFF:
            raise self.fail(dest, text, "must be between 1 and 4294967295")
        return value

    def route_table(self, dest: str) -> int:
        value = self.uint32(dest)
        if value in _RESERVED_ROUTE_TABLES:
            raise self.fail(dest, self.raw[dest], "route tables 253-255 are the kernel's own")
        return value

    def mode(self, dest: str) -> str:
        value = self.raw[dest].strip().upper()
        if value not in (REDIRECT, TPROXY):
            raise self.fail(dest, self.raw[dest], "must be REDIRECT or TPROXY")
        return value

    def choice(self, dest: str, choices: tuple[str, ...]) -> str:
        value = self.raw[dest].strip().lower()
        if value not in choices:
            raise self.fail(dest, self.raw[dest], "must be one of " + ", ".join(choices))
        return value

    def switch(self, dest: str) -> bool:
        value = switch_value(self.raw[dest])
        if value is None:
            raise self.fail(dest, self.raw[dest], "must be true or false")
        return value

    def tristate(self, dest: str) -> bool | None:
        if self.raw[dest].strip().lower() == "auto":
            return None
        return self.switch(dest)

    def duration(self, dest: str) -> float:
        text = self.raw[dest].strip(" ")
        if len(text) > _MAX_DURATION_CHARS:
            raise self.fail(dest, text, f"longer than {_MAX_DURATION_CHARS} characters")
        if _is_plain_number(text):
            seconds = float(text)
        else:
            parts = _duration_parts(text)
            if not text or parts is None:
                raise self.fail(dest, text, "not a duration such as 5s or 500ms")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        # 64 characters of digits still make 1e63 s; a probe waits an hour at most.
        if not seconds <= _MAX_PROBE_SECONDS:
            raise self.fail(dest, text, f"longer than {_MAX_PROBE_SECONDS:g}s (1h)")
        return seconds

    def namespace(self, dest: str) -> str | None:
        value = self.raw[dest].strip(" ")
        if not value:
            return None
        if len(value.encode()) > _PATH_MAX:
            raise self.fail(dest, value, f"longer than {_PATH_MAX} bytes")
        if "/" not in value:
            if value in (".", "..") or any(c.isspace() for c in value) or len(value.encode()) > _NAME_MAX:
                raise self.fail(dest, value, "not a network namespace name")
            return os.path.join("/run/netns", value)
        return value


class _RowParser(_Parser):
    """The parsers the flag rows name (FlagSpec.parser), on top of the value checks above."""

    def rule_set(self, dest: str) -> str:
        return self.version

    def ports(self, dest: str) -> tuple[int, ...]:
        return self.port_list(dest, wildcard=False).items

    def ports_or_all(self, dest: str) -> AllOrList[int]:
        return self.port_list(dest, wildcard=True)

    def cidrs(self, dest: str) -> tuple[Cidr, ...]:
        return self.cidr_list(dest, wildcard=False, need_prefix=self.version == RULES_CURRENT).items

    def cidrs_or_all(self, dest: str) -> AllOrList[Cidr]:
        # Current Istio: CIDRs need a prefix length.
        return self.cidr_list(dest, wildcard=True, need_prefix=self.version == RULES_CURRENT)

    def dns(self, dest: str) -> bool:
        """--redirect-dns, or ISTIO_META_DNS_CAPTURE: as its variable (current), or also on (older)."""
        alias = self.environ.get(DNS_CAPTURE_ALIAS)
        if self.version == RULES_CURRENT:
            if self.sources[dest] != "flag" and alias is not None:
                self.raw[dest], self.sources[dest] = alias, DNS_CAPTURE_ALIAS
            return self.switch(dest)
        return self.switch(dest) or (alias or "").lower() == "true"

    def backend(self, dest: str) -> str:
        """--iptables-backend, or current Istio's --force-iptables-binary mapped onto it."""
        backend = self.choice(dest, BACKENDS)
        forced = self.raw["force_iptables_binary"].strip()
        if not forced:
            return backend
        forced = self.choice("force_iptables_binary", ("legacy", "nft"))
        if self.sources[dest] != "default" and backend != forced:
            raise self.fail("force_iptables_binary", forced, f"contradicts --iptables-backend {backend}")
        return forced

    def checked_by_backend(self, dest: str) -> None:
        """Its value is checked (and used) by `backend`."""

    def groups(self, dest: str) -> tuple[int, ...]:
        return self.group_list(dest, wildcard=False).items

    def groups_or_all(self, dest: str) -> AllOrList[int]:
        """Group names or gids, or '*' (Istio's limit: at most 64, one rule of N owner matches)."""
        include = self.group_list(dest, wildcard=True)
        if len(include.items) > MAX_OWNER_GROUPS_INCLUDE:
            raise self.fail(dest, self.raw[dest], f"at most {MAX_OWNER_GROUPS_INCLUDE} groups, "
                                                  f"got {len(include.items)}")
        return include

    def text(self, dest: str) -> str:
        return self.raw[dest]


def flag_label(dest: str, sources: Mapping[str, str]) -> str:
    """How a message names the flag and, when the value came from one, its variable."""
    spec = FLAGS_BY_DEST[dest]
    label = spec.label
    source = sources.get(dest, "")
    if source not in ("flag", "default", "") and not spec.env_only:
        label = f"{label} (from {source})"
    return label
