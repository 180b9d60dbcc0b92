"""The CNI agent's second source of pod facts: the pod as the API server has it (`--kubeconfig`).

The runtime's annotations cannot say what the istio-proxy container runs as, and OpenShift assigns
it a uid of its own; Istio's CNI plugin therefore reads the pod from the API server (istio/istio
`cni/pkg/plugin/kubernetes.go`, `getK8sPodInfo`): the annotations, and the istio-proxy container's
`runAsUser`, `runAsGroup` and environment. So does this source, with Istio's retry (up to 30
tries a second apart, `podRetrievalMaxRetries`), and only a GET of one pod: the RBAC it needs is
`get` on `pods`.

A kubeconfig here is the usual file (YAML or JSON): its current context's server, CA, and either
a client certificate and key or a bearer token (`token` or `tokenFile`, re-read on every request
so a projected service-account token keeps working), each as a path or as inline `-data`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from istio_init.errors import ConfigError, PodLookupError
from istio_init.podcapture import PodFacts, k8s_pod

KUBECONFIG_FLAG = "--kubeconfig"
PROXY_CONTAINER = "istio-proxy"
RETRIES = 30  # Istio's podRetrievalMaxRetries
RETRY_INTERVAL = 1.0  # seconds, Istio's podRetrievalInterval
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class ApiAccess:
    """Where the API server is and how to authenticate, from a kubeconfig's current context."""

    host: str
    port: int
    context: ssl.SSLContext
    token: str | None = None
    token_file: str | None = None

    def bearer(self) -> str | None:
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return self.token


def load_kubeconfig(path: str) -> ApiAccess:
    """The access a kubeconfig file describes; a ConfigError naming --kubeconfig when it cannot be used."""
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no annotations

    def refuse(reason: str) -> ConfigError:
        return ConfigError(KUBECONFIG_FLAG, path, reason)

    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    except yaml.YAMLError as exc:
        raise refuse(f"not YAML: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(document, Mapping):
        raise refuse("not a kubeconfig (no map at the top)")
    base = os.path.dirname(os.path.abspath(path))
    cluster, user = _current(document, refuse)
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise refuse(f"the cluster's server must be an https:// URL, found {server!r}")
    url = urllib.parse.urlsplit(server)
    if not url.hostname:
        raise refuse(f"the cluster's server has no host: {server!r}")
    context = ssl.create_default_context()
    try:
        ca = _material(cluster, "certificate-authority", base)
        if ca is not None:
            context.load_verify_locations(cafile=ca)
        if cluster.get("insecure-skip-tls-verify") is True:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        cert, key = _material(user, "client-certificate", base), _material(user, "client-key", base)
        if (cert is None) != (key is None):
            raise refuse("the user has a client certificate without its key, or a key without its certificate")
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise refuse(f"its certificates cannot be loaded: {exc}") from None
    token = user.get("token")
    token_file = user.get("tokenFile")
    if token_file is not None:
        token_file = os.path.join(base, str(token_file))
        if not os.access(token_file, os.R_OK):
            raise refuse(f"the user's tokenFile {token_file} cannot be read")
    if cert is None and token is None and token_file is None:
        raise refuse("the user has neither a client certificate nor a token")
    return ApiAccess(url.hostname, url.port or 443, context, str(token) if token is not None else None, token_file)


def _current(document: Mapping[str, Any], refuse: Callable[[str], ConfigError]) -> tuple[Mapping[str, Any],
                                                                                            Mapping[str, Any]]:
    """The current context's cluster and user entries."""
    def named(kind: str, name: Any) -> Mapping[str, Any]:
        for entry in document.get(f"{kind}s") or []:
            if isinstance(entry, Mapping) and entry.get("name") == name and isinstance(entry.get(kind), Mapping):
                return entry[kind]  # type: ignore[no-any-return]
        raise refuse(f"no {kind} named {name!r}")

    contexts = document.get("contexts") or []
    current = document.get("current-context")
    if current is None and len(contexts) == 1 and isinstance(contexts[0], Mapping):
        current = contexts[0].get("name")
    context = named("context", current)
    return named("cluster", context.get("cluster")), named("user", context.get("user"))


def _material(entry: Mapping[str, Any], key: str, base: str) -> str | None:
    """A file holding the entry's `key` (a path) or `key-data` (base64, written to a private file)."""
    if entry.get(f"{key}-data"):
        data = base64.b64decode(str(entry[f"{key}-data"]), validate=True)
        fd, name = tempfile.mkstemp(prefix="istio-init-kubeconfig-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
    if entry.get(key):
        return os.path.join(base, str(entry[key]))
    return None


def get_pod(access: ApiAccess, namespace: str, name: str) -> dict[str, Any]:
    """GET one pod (one try); PodLookupError with the server's answer otherwise."""
    path = f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods/{urllib.parse.quote(name)}"
    headers = {"Accept": "application/json", "User-Agent": "istio-init-cni-agent"}
    try:
        bearer = access.bearer()
    except OSError as exc:
        raise PodLookupError(f"the kubeconfig's token file cannot be read: {exc}") from None
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    conn = http.client.HTTPSConnection(access.host, access.port, timeout=REQUEST_TIMEOUT, context=access.context)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise PodLookupError(f"the API server at {access.host}:{access.port} did not answer: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        message = body.decode("utf-8", "replace")
        try:
            message = json.loads(message).get("message", message)
        except ValueError:
            pass
        raise PodLookupError(f"the API server answered {response.status} for pod {namespace}/{name}: {message}")
    pod: dict[str, Any] = json.loads(body)
    return pod


def facts_from_pod(pod: Mapping[str, Any]) -> PodFacts:
    """Istio's reading of a pod: its annotations, the istio-proxy container's uid, gid and env."""
    metadata = pod.get("metadata") or {}
    annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
    uid = gid = None
    env: dict[str, str] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") != PROXY_CONTAINER:
            continue
        security = container.get("securityContext") or {}
        uid, gid = security.get("runAsUser"), security.get("runAsGroup")
        env = {str(e["name"]): str(e.get("value", "")) for e in container.get("env") or [] if "name" in e}
    return PodFacts(str(metadata.get("namespace", "")), str(metadata.get("name", "")), annotations,
                    int(uid) if uid is not None else None, int(gid) if gid is not None else None, env)


def api_facts_source(access: ApiAccess, exclude_namespaces: tuple[str, ...],
                     sleep: Callable[[float], None] = time.sleep) -> Callable[[str, Any], PodFacts]:
    """A pod-facts source for the agent: the pod named in CNI_ARGS, fetched with Istio's retries.

    Pods of excluded namespaces are not fetched (the decision skips them by namespace), so the
    agent's own namespace starts pods while the API server is out of reach."""
    def facts(cni_args: str, runtime_config: Any) -> PodFacts:
        namespace, name = k8s_pod(cni_args)
        if not namespace or not name or namespace in exclude_namespaces:
            return PodFacts(namespace, name, {})
        last: PodLookupError | None = None
        for attempt in range(RETRIES):
            try:
                return facts_from_pod(get_pod(access, namespace, name))
            except PodLookupError as exc:
                last = exc
                if attempt + 1 < RETRIES:
                    sleep(RETRY_INTERVAL)
        assert last is not None
        raise PodLookupError(f"{last} (after {RETRIES} tries)")
    return facts
