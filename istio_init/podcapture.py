"""Whether the CNI form captures a pod, and with which flags: decided from the pod's own facts.

A node-wide set of flags would redirect every pod on the node, including the
ones without a sidecar, to a port where nothing listens. So, as Istio's own
CNI plugin (istio/istio `cni/pkg/plugin/plugin.go`, `sidecar_redirect.go`),
each pod sandbox is decided on its own: by its namespace, its
`sidecar.istio.io/*` and `traffic.sidecar.istio.io/*` annotations, and the
settings Istio reads from the istio-proxy container's environment (mesh-wide
here, overridden per pod by `proxy.istio.io/config`'s `proxyMetadata`).

Where the facts come from is one seam, `PodFacts`: today the container
runtime hands the annotations to the plugin (containerd >= 1.5 and CRI-O >=
1.29, with the `io.kubernetes.cri.pod-annotations` capability), so no API
server is asked. Everything here is pure: facts in, a `Skip` or a `Capture`
(a validated Config of the current rule set) out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from istio_init.config import (FLAGS_BY_DEST, GO_SWITCH_WORDS, RULES_CURRENT, WILDCARD, Config, from_sources,
                               switch_value)
from istio_init.errors import AnnotationError, ConfigError

# Annotation names (istio/api annotation/annotations.yaml; facts, as Istio spells them).
INJECT = "sidecar.istio.io/inject"
STATUS = "sidecar.istio.io/status"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"  # deprecated for the one above
PROXY_CONFIG = "proxy.istio.io/config"

# The capability a chained plugin declares to receive the annotations, and who honours it.
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
RUNTIMES_WITH_CAPABILITY = "containerd 1.5 or later, CRI-O 1.29 or later"

# The istio-proxy environment settings the CNI form honours (sidecar_redirect.go reads these three).
DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
INVALID_DROP = "INVALID_DROP"
DUAL_STACK = "ISTIO_DUAL_STACK"
PROXY_SETTINGS = (DNS_CAPTURE, INVALID_DROP, DUAL_STACK)
# An istio-proxy environment setting that leaves the pod without a proxy (plugin.go skips the pod).
DISABLE_ENVOY = "DISABLE_ENVOY"

# Istio's own init container: a pod that has it captures itself.
ISTIO_INIT_CONTAINER = "istio-init"
# Ports the sidecar serves itself (status, health, Prometheus): never redirected inbound.
SIDECAR_OWN_PORTS = ("15020", "15021", "15090")
DEFAULT_PROXY_ID = 1337


@dataclass(frozen=True)
class PodFacts:
    """What the decision needs to know about one pod sandbox.

    `annotations` is None when the runtime did not pass them at all (the key
    was absent), which is different from a pod without annotations ({}).
    `proxy_uid`/`proxy_gid` are the istio-proxy container's runAsUser and
    runAsGroup, and `proxy_env` its environment, known only to a source that
    reads the pod spec (None: 1337, and no environment).
    """

    namespace: str
    name: str
    annotations: Mapping[str, str] | None
    proxy_uid: int | None = None
    proxy_gid: int | None = None
    proxy_env: Mapping[str, str] | None = None


@dataclass(frozen=True)
class MeshSettings:
    """Node-wide settings: the excluded namespaces and the istio-proxy environment defaults."""

    exclude_namespaces: tuple[str, ...] = ("kube-system",)
    proxy_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """The pod gets nothing of ours: the reason goes to the log."""

    reason: str


@dataclass(frozen=True)
class Capture:
    """The pod is captured with `config`; `flags` are the init container's flags that made it."""

    config: Config
    flags: tuple[str, ...]


def k8s_pod(cni_args: str) -> tuple[str, str]:
    """(K8S_POD_NAMESPACE, K8S_POD_NAME) from CNI_ARGS (`K=V;K=V`, any order); '' when absent."""
    values: dict[str, str] = {}
    for item in cni_args.split(";"):
        key, _, value = item.partition("=")
        values[key.strip()] = value.strip()
    return values.get("K8S_POD_NAMESPACE", ""), values.get("K8S_POD_NAME", "")


def facts_from_runtime(cni_args: str, runtime_config: Mapping[str, Any] | None) -> PodFacts:
    """The pod's facts as the container runtime delivers them to a chained plugin.

    `runtime_config` is the network configuration's `runtimeConfig`; the
    annotations are under the capability's key, null when the pod has none.
    """
    namespace, name = k8s_pod(cni_args)
    annotations: Mapping[str, str] | None = None
    if isinstance(runtime_config, Mapping) and ANNOTATIONS_CAPABILITY in runtime_config:
        given = runtime_config[ANNOTATIONS_CAPABILITY]
        if given is None:
            annotations = {}
        elif isinstance(given, Mapping) and all(isinstance(v, str) for v in given.values()):
            annotations = dict(given)
        else:
            raise AnnotationError(f"runtimeConfig[{ANNOTATIONS_CAPABILITY!r}] is not a map of strings")
    return PodFacts(namespace, name, annotations)


def decide(facts: PodFacts, mesh: MeshSettings) -> Skip | Capture:
    """Istio's order: not a Kubernetes pod, excluded namespace, inject false, no status, istio-init."""
    if not facts.namespace or not facts.name:
        return Skip("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)")
    if facts.namespace in mesh.exclude_namespaces:
        return Skip(f"namespace {facts.namespace} is excluded")
    if facts.annotations is None:
        raise AnnotationError(
            f"the container runtime passed no pod annotations: the plugin's entry declares the capability "
            f"{ANNOTATIONS_CAPABILITY!r}, which {RUNTIMES_WITH_CAPABILITY} honour")
    annotations = facts.annotations
    if go_bool((facts.proxy_env or {}).get(DISABLE_ENVOY, "")) is True:
        return Skip(f"the istio-proxy container's {DISABLE_ENVOY} is true")
    if go_bool(annotations.get(INJECT, "")) is False:
        return Skip(f"{INJECT} is {annotations[INJECT]!r}")
    if STATUS not in annotations:
        return Skip(f"no {STATUS} annotation (no sidecar injected)")
    if ISTIO_INIT_CONTAINER in _status_init_containers(annotations[STATUS]):
        return Skip(f"{STATUS} lists the {ISTIO_INIT_CONTAINER} init container: the pod captures itself")
    flags, sources = capture_flags(facts, mesh)
    given: dict[str, str | bool | None] = dict(flags)
    try:
        config = from_sources(given, environ={})
    except ConfigError as exc:
        culprit = next((d for d, _ in flags if exc.flag.split(" (")[0] == FLAGS_BY_DEST[d].label), "")
        raise AnnotationError(f"invalid value for {sources.get(culprit, exc.flag)}: {exc.value!r}: "
                              f"{exc.reason}") from None
    return Capture(config, tuple(_as_argv(flags)))


def capture_flags(facts: PodFacts, mesh: MeshSettings) -> tuple[list[tuple[str, str | bool]], dict[str, str]]:
    """The init container's flags for a captured pod, as sidecar_redirect.go builds them.

    Returns (dest, value) pairs and, for each dest that an annotation fed,
    that annotation's name (so an invalid value is reported under it).
    """
    annotations = facts.annotations or {}
    sources: dict[str, str] = {}

    def annotation(dest: str, name: str, default: str) -> str:
        if name in annotations:
            sources[dest] = name
            return annotations[name]
        return default

    mode = annotation("inbound_interception_mode", INTERCEPTION_MODE, "REDIRECT")
    if mode not in ("REDIRECT", "TPROXY"):  # Istio compares exactly, case included
        raise AnnotationError(f"invalid value for {INTERCEPTION_MODE}: {mode!r}: must be REDIRECT or TPROXY")
    exclude_inbound = annotation("local_exclude_ports", EXCLUDE_INBOUND_PORTS, "15020").strip()
    ports = [port for port in exclude_inbound.split(",") if port] + list(SIDECAR_OWN_PORTS)
    if REROUTE_VIRTUAL_INTERFACES in annotations:
        virt = annotation("kube_virt_interfaces", REROUTE_VIRTUAL_INTERFACES, "")
    else:
        virt = annotation("kube_virt_interfaces", KUBEVIRT_INTERFACES, "")
    settings = proxy_settings(annotations, mesh, facts.proxy_env)
    uid = str(facts.proxy_uid) if facts.proxy_uid else str(DEFAULT_PROXY_ID)
    gid = str(facts.proxy_gid) if facts.proxy_gid else str(DEFAULT_PROXY_ID)
    flags: list[tuple[str, str | bool]] = [
        ("rules_version", RULES_CURRENT),
        ("envoy_port", "15001"),
        ("inbound_capture_port", "15006"),
        ("proxy_uid", uid),
        ("proxy_gid", gid),
        ("inbound_interception_mode", mode),
        ("service_cidr", annotation("service_cidr", INCLUDE_OUTBOUND_IP_RANGES, WILDCARD)),
        ("service_exclude_cidr", annotation("service_exclude_cidr", EXCLUDE_OUTBOUND_IP_RANGES, "")),
        ("inbound_ports", annotation("inbound_ports", INCLUDE_INBOUND_PORTS, WILDCARD)),
        ("local_exclude_ports", ",".join(dict.fromkeys(ports))),
        ("outbound_ports", annotation("outbound_ports", INCLUDE_OUTBOUND_PORTS, "")),
        ("outbound_ports_exclude", annotation("outbound_ports_exclude", EXCLUDE_OUTBOUND_PORTS, "15020")),
        ("kube_virt_interfaces", virt),
        ("exclude_interfaces", annotation("exclude_interfaces", EXCLUDE_INTERFACES, "")),
        # The node applies for the pod: the xtables lock is the pod's namespace, not the node's.
        ("cni_mode", True),
    ]
    sources["local_exclude_ports"] = EXCLUDE_INBOUND_PORTS
    if settings[DNS_CAPTURE]:  # the CNI form captures every port-53 query, never per resolv.conf
        flags += [("redirect_dns", True), ("capture_all_dns", True)]
    if settings[INVALID_DROP]:
        flags.append(("drop_invalid", True))
    if settings[DUAL_STACK]:
        flags.append(("dual_stack", True))
    for dest, _ in flags:
        sources.setdefault(dest, FLAGS_BY_DEST[dest].label)
    return [(d, v) for d, v in flags if v != ""], sources


def proxy_settings(annotations: Mapping[str, str], mesh: MeshSettings,
                   proxy_env: Mapping[str, str] | None = None) -> dict[str, bool]:
    """The three istio-proxy settings: mesh-wide, overridden by the pod's proxyMetadata, and both
    by the istio-proxy container's own environment when the source read it (what the injector
    rendered from them, as Istio's plugin reads it)."""
    merged: dict[str, tuple[str, str]] = {name: (mesh.proxy_env[name], f"the agent's {name}")
                                         for name in PROXY_SETTINGS if name in mesh.proxy_env}
    metadata = _proxy_metadata(annotations)
    for name in PROXY_SETTINGS:
        if name in metadata:
            merged[name] = (metadata[name], f"{PROXY_CONFIG} proxyMetadata.{name}")
        if proxy_env and name in proxy_env:
            merged[name] = (proxy_env[name], f"the istio-proxy container's {name}")
    settings = {}
    for name in PROXY_SETTINGS:
        text, where = merged.get(name, ("false", ""))
        value = go_bool(text)
        if value is None:
            raise AnnotationError(f"invalid value for {where}: {text!r}: must be true or false")
        settings[name] = value
    return settings


def _proxy_metadata(annotations: Mapping[str, str]) -> dict[str, str]:
    """`proxyMetadata` of the pod's ProxyConfig annotation (YAML, of which JSON is a part)."""
    if PROXY_CONFIG not in annotations:
        return {}
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no annotations

    text = annotations[PROXY_CONFIG]
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else "not YAML"
        raise AnnotationError(f"invalid value for {PROXY_CONFIG}: {_short(text)!r}: {problem}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise AnnotationError(f"invalid value for {PROXY_CONFIG}: {_short(text)!r}: not a ProxyConfig map")
    metadata = document.get("proxyMetadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, (str, bool)) for v in metadata.values()):
        raise AnnotationError(f"invalid value for {PROXY_CONFIG}: {_short(text)!r}: "
                              "proxyMetadata must map names to strings")
    return {str(k): (str(v).lower() if isinstance(v, bool) else v) for k, v in metadata.items()}


def _status_init_containers(text: str) -> list[str]:
    """`initContainers` of the injector's status JSON; [] when it is not that JSON (Istio's tests use "true")."""
    try:
        status = json.loads(text)
    except ValueError:
        return []
    if not isinstance(status, dict) or not isinstance(status.get("initContainers"), list):
        return []
    return [name for name in status["initContainers"] if isinstance(name, str)]


def go_bool(text: str) -> bool | None:
    """Go's strconv.ParseBool, which Istio uses for these values; None when it is not a boolean."""
    return switch_value(text, GO_SWITCH_WORDS, exact=True)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _as_argv(flags: list[tuple[str, str | bool]]) -> list[str]:
    """The flags as the init container's command line (for the log and `istio-init check`)."""
    argv: list[str] = []
    for dest, value in flags:
        spec = FLAGS_BY_DEST[dest]
        name = f"-{spec.short}" if spec.short else f"--{spec.long}"
        argv += [name] if value is True else [name, str(value)]
    return argv
