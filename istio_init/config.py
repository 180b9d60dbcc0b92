"""Flags and environment in, one validated immutable `Config` out.

Every value is checked here, before any kernel state is read or changed, so a
typo in a pod spec fails the init container with one line naming the flag
instead of half a rule set (Istio 1.8 printed a warning and dropped bad CIDRs).
The flag table below is the single place a flag's names, environment variable,
default and help text are spelled; the CLI builds its options from it.
"""

from __future__ import annotations

import functools
import os
import re
from types import MappingProxyType
from typing import Mapping, NamedTuple

from istio_init.errors import ConfigError



class Cidr(NamedTuple):
    """A validated CIDR in network form (`10.1.2.3/8` -> `10.0.0.0/8`), as rules spell it."""

    text: str
    version: int
    is_loopback: bool

    def __str__(self) -> str:
        return self.text


_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HOST = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}(?:/32)?"


# Compiled on first use: most pod starts parse no CIDR at all (the seed's -i '*' -x "").
@functools.lru_cache(maxsize=None)
def _simple_ipv4_cidr() -> re.Pattern[str]:
    return re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?\d))?")


@functools.lru_cache(maxsize=None)
def _ipv4_host_list() -> re.Pattern[str]:
    """A whole list of IPv4 host addresses (`a.b.c.d` or `a.b.c.d/32`), comma-separated, in one match."""
    return re.compile(rf"{_HOST}(?:,{_HOST})*")


def parse_cidrs(items: list[str]) -> list[Cidr]:
    """`parse_cidr` of each item; ValueError names none (the caller finds the bad one).

    A long -x list is typically thousands of IPv4 host addresses: one regular
    expression match over the whole list validates them, and each becomes its
    Cidr without a per-item match (8,000 items: about 5 ms instead of 30).
    """
    if len(items) > 16 and _ipv4_host_list().fullmatch(",".join(items)):
        return [Cidr(item if item.endswith("/32") else f"{item}/32", 4, item.startswith("127."))
                for item in items]
    return [parse_cidr(item) for item in items]


def parse_cidr(text: str) -> Cidr:
    """`text` as a Cidr, or ValueError. A bare address is a host route (/32, /128).

    The common IPv4 form is parsed here: an -x list of a thousand CIDRs went
    through `ipaddress` in about 5 ms of every pod start. Everything else
    (IPv6, netmask notation) is left to `ipaddress`, which decides what is valid.
    """
    simple = _simple_ipv4_cidr().fullmatch(text)
    if simple:
        a, b, c, d, prefix = simple.groups()
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
_FORBIDDEN = re.compile(r"[;&|$`<>(){}\[\]\\'\"!?~#\x00-\x1f\x7f]")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Route tables the kernel uses itself: a `local default` route in one of them
# would swallow every packet of the pod.
_RESERVED_ROUTE_TABLES = {0, 253, 254, 255}
_IFNAMSIZ = 16


class FlagSpec(NamedTuple):
    """One command-line flag: its names, environment fallback, default and help."""

    dest: str
    short: str | None
    long: str
    env: str | None
    default: str
    help: str
    is_switch: bool = False

    @property
    def label(self) -> str:
        """How error messages name the flag: `-p/--envoy-port`."""
        return f"-{self.short}/--{self.long}" if self.short else f"--{self.long}"


FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec("envoy_port", "p", "envoy-port", "ENVOY_PORT", "15001",
             "Port the sidecar listens on for captured outbound TCP."),
    FlagSpec("inbound_capture_port", "z", "inbound-capture-port", "INBOUND_CAPTURE_PORT", "15006",
             "Port the sidecar listens on for captured inbound TCP."),
    FlagSpec("inbound_tunnel_port", "e", "inbound-tunnel-port", "INBOUND_TUNNEL_PORT", "15008",
             "Inbound tunnel port; never captured."),
    FlagSpec("proxy_uid", "u", "proxy-uid", "PROXY_UID", "",
             "Comma list of uids the proxy runs as; their traffic is never captured. "
             "Default: uid of user $ENVOY_USER (istio-proxy), else 1337."),
    FlagSpec("proxy_gid", "g", "proxy-gid", "PROXY_GID", "",
             "Comma list of gids the proxy runs as. Default: the -u value."),
    FlagSpec("inbound_interception_mode", "m", "istio-inbound-interception-mode",
             "ISTIO_INBOUND_INTERCEPTION_MODE", REDIRECT,
             "How inbound TCP reaches the proxy: REDIRECT (nat) or TPROXY (mangle, keeps the "
             "original source address)."),
    FlagSpec("inbound_ports", "b", "istio-inbound-ports", "ISTIO_INBOUND_PORTS", "",
             "Inbound ports to capture: '*' for all, or a comma list. Empty: no inbound capture."),
    FlagSpec("local_exclude_ports", "d", "istio-local-exclude-ports", "ISTIO_LOCAL_EXCLUDE_PORTS", "",
             "Comma list of inbound ports left alone when -b is '*'. Port 22 always is."),
    FlagSpec("service_cidr", "i", "istio-service-cidr", "ISTIO_SERVICE_CIDR", "",
             "Outbound destinations to capture: '*' for all, or a comma list of CIDRs (IPv4 and "
             "IPv6 may be mixed). Empty: no outbound capture."),
    FlagSpec("service_exclude_cidr", "x", "istio-service-exclude-cidr", "ISTIO_SERVICE_EXCLUDE_CIDR", "",
             "Comma list of CIDRs never captured outbound. '*' is not allowed."),
    FlagSpec("outbound_ports", "q", "istio-outbound-ports", "ISTIO_OUTBOUND_PORTS", "",
             "Comma list of outbound ports always captured, whatever -i says (IPv4 only)."),
    FlagSpec("outbound_ports_exclude", "o", "istio-local-outbound-ports-exclude",
             "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "",
             "Comma list of outbound ports never captured."),
    FlagSpec("kube_virt_interfaces", "k", "kube-virt-interfaces", "KUBE_VIRT_INTERFACES", "",
             "Comma list of interfaces (KubeVirt VMs) whose inbound traffic is treated as outbound."),
    FlagSpec("tproxy_mark", "t", "istio-inbound-tproxy-mark", "ISTIO_INBOUND_TPROXY_MARK", "1337",
             "Firewall mark set on TPROXY-captured packets (decimal or 0x hex)."),
    FlagSpec("tproxy_route_table", "r", "istio-inbound-tproxy-route-table",
             "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "133",
             "Policy-routing table that delivers TPROXY-marked packets locally."),
    FlagSpec("iptables_probe_port", None, "iptables-probe-port", "IPTABLES_PROBE_PORT", "15002",
             "Port of the local listener --run-validation connects through."),
    FlagSpec("probe_timeout", None, "probe-timeout", "PROBE_TIMEOUT", "5s",
             "How long --run-validation waits, as a duration such as 5s or 500ms."),
    FlagSpec("iptables_backend", None, "iptables-backend", "ISTIO_IPTABLES_BACKEND", "auto",
             "How rules reach the kernel: libiptc, legacy or nft (iptables-restore), or auto."),
    FlagSpec("network_namespace", None, "network-namespace", "NETWORK_NAMESPACE", "",
             "Apply in this network namespace (a name under /run/netns or a path such as "
             "/proc/PID/ns/net) instead of the current one."),
    FlagSpec("ipv6", None, "ipv6", "ISTIO_IPV6", "auto",
             "Make IPv6 rules: auto (when the pod's first address is IPv6), true or false."),
    FlagSpec("dry_run", "n", "dry-run", "DRY_RUN", "false",
             "Print the rules in iptables-save form and change nothing.", is_switch=True),
    FlagSpec("skip_rule_apply", None, "skip-rule-apply", "SKIP_RULE_APPLY", "false",
             "Do not apply any rules (useful with --run-validation).", is_switch=True),
    FlagSpec("run_validation", None, "run-validation", "RUN_VALIDATION", "false",
             "After applying, prove an outbound connection is redirected; exit 126 if not.",
             is_switch=True),
    FlagSpec("redirect_dns", None, "redirect-dns", "REDIRECT_DNS", "false",
             "Capture DNS (UDP and TCP port 53) to port 15053. Also on when "
             "ISTIO_META_DNS_CAPTURE=true.", is_switch=True),
    FlagSpec("multiport", None, "multiport", "ISTIO_MULTIPORT", "false",
             "Group port lists into '-m multiport' rules of up to 15 ports (not Istio's rule "
             "set; fewer rules for long lists).", is_switch=True),
)

FLAGS_BY_DEST = {spec.dest: spec for spec in FLAGS}


class Config(NamedTuple):
    """Everything the planner and backends need, validated and normalised.

    A NamedTuple, as the model's types are, for its start-up cost (see model.py).
    """

    envoy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[int, ...] = (1337,)
    proxy_gids: tuple[int, ...] = (1337,)
    inbound_interception_mode: str = REDIRECT
    capture_all_inbound: bool = False
    inbound_ports: tuple[int, ...] = ()
    local_exclude_ports: tuple[int, ...] = ()
    capture_all_outbound: bool = False
    outbound_cidrs: tuple[Cidr, ...] = ()
    exclude_cidrs: tuple[Cidr, ...] = ()
    outbound_ports: tuple[int, ...] = ()
    outbound_ports_exclude: tuple[int, ...] = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = 1337
    tproxy_route_table: int = 133
    dns_capture: bool = False
    multiport: bool = False
    ipv6: bool | None = None  # None: decided from the pod's addresses
    dry_run: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    iptables_probe_port: int = 15002
    probe_timeout: float = 5.0
    iptables_backend: str = "auto"
    network_namespace: str | None = None
    # Where each value came from, for the effective-configuration summary.
    sources: Mapping[str, str] = MappingProxyType({})

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == TPROXY

    @property
    def inbound_enabled(self) -> bool:
        return self.capture_all_inbound or bool(self.inbound_ports)


def default_proxy_uid(environ: Mapping[str, str]) -> str:
    """Istio's default: the uid of $ENVOY_USER (istio-proxy), else 1337."""
    import pwd

    try:
        return str(pwd.getpwnam(environ.get("ENVOY_USER") or "istio-proxy").pw_uid)
    except KeyError:
        return "1337"


def from_sources(given: Mapping[str, str | bool | None], environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config: command line beats environment beats default.

    `given` maps a flag's dest to the raw value typed on the command line, or
    None when the flag was not given. Raises ConfigError on the first bad value.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    for spec in FLAGS:
        value = given.get(spec.dest)
        if value is not None and value is not False:
            raw[spec.dest] = "true" if value is True else str(value)
            sources[spec.dest] = "flag"
        elif spec.env and environ.get(spec.env) is not None:
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

    parse = _Parser(raw, sources)
    for spec in FLAGS:
        parse.check_characters(spec.dest)

    mode = parse.mode("inbound_interception_mode")
    inbound_all, inbound_ports = parse.port_list("inbound_ports", wildcard=True)
    outbound_all, outbound_cidrs = parse.cidr_list("service_cidr", wildcard=True)
    _, exclude_cidrs = parse.cidr_list("service_exclude_cidr", wildcard=False)
    dns = parse.switch("redirect_dns") or environ.get("ISTIO_META_DNS_CAPTURE", "").lower() == "true"
    return Config(
        envoy_port=parse.port("envoy_port"),
        inbound_capture_port=parse.port("inbound_capture_port"),
        inbound_tunnel_port=parse.port("inbound_tunnel_port"),
        proxy_uids=parse.id_list("proxy_uid"),
        proxy_gids=parse.id_list("proxy_gid"),
        inbound_interception_mode=mode,
        capture_all_inbound=inbound_all,
        inbound_ports=inbound_ports,
        local_exclude_ports=parse.port_list("local_exclude_ports", wildcard=False)[1],
        capture_all_outbound=outbound_all,
        outbound_cidrs=outbound_cidrs,
        exclude_cidrs=exclude_cidrs,
        outbound_ports=parse.port_list("outbound_ports", wildcard=False)[1],
        outbound_ports_exclude=parse.port_list("outbound_ports_exclude", wildcard=False)[1],
        kube_virt_interfaces=parse.interfaces("kube_virt_interfaces"),
        tproxy_mark=parse.uint32("tproxy_mark"),
        tproxy_route_table=parse.route_table("tproxy_route_table"),
        dns_capture=dns,
        multiport=parse.switch("multiport"),
        ipv6=parse.tristate("ipv6"),
        dry_run=parse.switch("dry_run"),
        skip_rule_apply=parse.switch("skip_rule_apply"),
        run_validation=parse.switch("run_validation"),
        iptables_probe_port=parse.port("iptables_probe_port"),
        probe_timeout=parse.duration("probe_timeout"),
        iptables_backend=parse.choice("iptables_backend", BACKENDS),
        network_namespace=parse.namespace("network_namespace"),
        sources=sources,
    )


class _Parser:
    """Turns one raw string per flag into typed values, failing with the flag's name."""

    def __init__(self, raw: Mapping[str, str], sources: Mapping[str, str]) -> None:
        self.raw = raw
        self.sources = sources

    def fail(self, dest: str, value: str, reason: str) -> ConfigError:
        spec = FLAGS_BY_DEST[dest]
        label = spec.label
        source = self.sources.get(dest, "")
        if source not in ("flag", "default", ""):
            label = f"{label} (from {source})"
        return ConfigError(label, value, reason)

    def check_characters(self, dest: str) -> None:
        value = self.raw[dest]
        bad = _FORBIDDEN.search(value)
        if bad:
            raise self.fail(dest, value, f"character {bad.group()!r} is not allowed")

    def items(self, dest: str) -> list[str]:
        """Comma list items, whitespace-trimmed; empty items are skipped as in Istio."""
        return [item.strip() for item in self.raw[dest].split(",") if item.strip()]

    def _port_value(self, dest: str, text: str) -> int:
        if not text.isdigit():
            raise self.fail(dest, text, "not a port number")
        port = int(text)
        if port > 65535:
            raise self.fail(dest, text, "port out of range 0-65535")
        return port

    def port(self, dest: str) -> int:
        return self._port_value(dest, self.raw[dest].strip())

    def port_list(self, dest: str, wildcard: bool) -> tuple[bool, tuple[int, ...]]:
        if self.raw[dest].strip() == WILDCARD:
            if not wildcard:
                raise self.fail(dest, self.raw[dest], "'*' is not allowed here; give a list of ports")
            return True, ()
        return False, tuple(self._port_value(dest, item) for item in self.items(dest))

    def cidr_list(self, dest: str, wildcard: bool) -> tuple[bool, tuple[Cidr, ...]]:
        if self.raw[dest].strip() == WILDCARD:
            if not wildcard:
                raise self.fail(dest, self.raw[dest], "'*' is not allowed here; give a list of CIDRs")
            return True, ()
        items = self.items(dest)
        try:
            return False, tuple(parse_cidrs(items))
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
            if not item.isdigit() or int(item) > 0xFFFFFFFE:
                raise self.fail(dest, item, "not a numeric id")
            ids.append(int(item))
        if not ids:
            raise self.fail(dest, self.raw[dest], "at least one numeric id is needed")
        return tuple(ids)

    def interfaces(self, dest: str) -> tuple[str, ...]:
        names = self.items(dest)
        for name in names:
            # The kernel's dev_valid_name(): 1-15 bytes, not . or .., no '/', ':' or space.
            if (len(name.encode()) >= _IFNAMSIZ or name in (".", "..")
                    or any(c in "/:" or c.isspace() for c in name)):
                raise self.fail(dest, name, "not an interface name the kernel accepts")
        return tuple(names)

    def uint32(self, dest: str) -> int:
        text = self.raw[dest].strip()
        try:
            value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise self.fail(dest, text, "not a number") from None
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
        value = self.raw[dest].strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("", "0", "false", "no", "off"):
            return False
        raise self.fail(dest, self.raw[dest], "must be true or false")

    def tristate(self, dest: str) -> bool | None:
        if self.raw[dest].strip().lower() == "auto":
            return None
        return self.switch(dest)

    def duration(self, dest: str) -> float:
        text = self.raw[dest].strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise self.fail(dest, text, "not a duration such as 5s or 500ms")
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)

    def namespace(self, dest: str) -> str | None:
        value = self.raw[dest].strip()
        if not value:
            return None
        if "/" not in value:
            if value in (".", "..") or any(c.isspace() for c in value):
                raise self.fail(dest, value, "not a network namespace name")
            return os.path.join("/run/netns", value)
        return value
