"""A small CRI client: the messages and calls of the runtime API the CNI tests need.

The message classes are built at run time from a descriptor written here,
with protobuf's descriptor_pb2 and message_factory, so no generated code and
no protoc are needed. Names, field numbers and types are facts from
kubernetes/cri-api `pkg/apis/runtime/v1/api.proto` (package runtime.v1, as
in the Kubernetes 1.20 to 1.26 source; containerd 1.6 serves it); only the
fields the tests use are declared (the rest pass as unknown fields), and
enums are declared as their wire type, int32.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "runtime.v1"
SERVICE = f"/{PACKAGE}.RuntimeService/"

# message -> [(field, number, type)]; type: a scalar, "map" (string to string), a message name,
# or "repeated TYPE".
MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "VersionRequest": [("version", 1, "string")],
    "StatusRequest": [("verbose", 1, "bool")],
    "StatusResponse": [("info", 2, "map")],
    "VersionResponse": [("version", 1, "string"), ("runtime_name", 2, "string"), ("runtime_version", 3, "string"),
                        ("runtime_api_version", 4, "string")],
    "PodSandboxMetadata": [("name", 1, "string"), ("uid", 2, "string"), ("namespace", 3, "string"),
                           ("attempt", 4, "uint32")],
    "LinuxPodSandboxConfig": [("cgroup_parent", 1, "string")],
    "PodSandboxConfig": [("metadata", 1, "PodSandboxMetadata"), ("hostname", 2, "string"),
                         ("log_directory", 3, "string"), ("labels", 6, "map"), ("annotations", 7, "map"),
                         ("linux", 8, "LinuxPodSandboxConfig")],
    "RunPodSandboxRequest": [("config", 1, "PodSandboxConfig"), ("runtime_handler", 2, "string")],
    "RunPodSandboxResponse": [("pod_sandbox_id", 1, "string")],
    "StopPodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "StopPodSandboxResponse": [],
    "RemovePodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "RemovePodSandboxResponse": [],
    "PodSandboxStatusRequest": [("pod_sandbox_id", 1, "string"), ("verbose", 2, "bool")],
    "PodSandboxNetworkStatus": [("ip", 1, "string")],
    "PodSandboxStatus": [("id", 1, "string"), ("state", 3, "int32"), ("network", 5, "PodSandboxNetworkStatus")],
    "PodSandboxStatusResponse": [("status", 1, "PodSandboxStatus"), ("info", 2, "map")],
    "PodSandbox": [("id", 1, "string"), ("metadata", 2, "PodSandboxMetadata"), ("state", 3, "int32")],
    "ListPodSandboxRequest": [],
    "ListPodSandboxResponse": [("items", 1, "repeated PodSandbox")],
    "ContainerMetadata": [("name", 1, "string"), ("attempt", 2, "uint32")],
    "ImageSpec": [("image", 1, "string")],
    "Mount": [("container_path", 1, "string"), ("host_path", 2, "string"), ("readonly", 3, "bool")],
    "Capability": [("add_capabilities", 1, "repeated string"), ("drop_capabilities", 2, "repeated string")],
    "Int64Value": [("value", 1, "int64")],
    "LinuxContainerSecurityContext": [("capabilities", 1, "Capability"), ("run_as_user", 5, "Int64Value"),
                                      ("run_as_group", 12, "Int64Value"), ("no_new_privs", 11, "bool")],
    "LinuxContainerConfig": [("security_context", 2, "LinuxContainerSecurityContext")],
    "ContainerConfig": [("metadata", 1, "ContainerMetadata"), ("image", 2, "ImageSpec"),
                        ("command", 3, "repeated string"), ("args", 4, "repeated string"),
                        ("mounts", 7, "repeated Mount"), ("log_path", 11, "string"),
                        ("linux", 15, "LinuxContainerConfig")],
    "CreateContainerRequest": [("pod_sandbox_id", 1, "string"), ("config", 2, "ContainerConfig"),
                               ("sandbox_config", 3, "PodSandboxConfig")],
    "CreateContainerResponse": [("container_id", 1, "string")],
    "StartContainerRequest": [("container_id", 1, "string")],
    "StartContainerResponse": [],
    "ContainerStatusRequest": [("container_id", 1, "string"), ("verbose", 2, "bool")],
    "ContainerStatus": [("id", 1, "string"), ("state", 3, "int32"), ("exit_code", 7, "int32"),
                        ("reason", 10, "string"), ("message", 11, "string")],
    "ContainerStatusResponse": [("status", 1, "ContainerStatus"), ("info", 2, "map")],
    "RemoveContainerRequest": [("container_id", 1, "string")],
    "RemoveContainerResponse": [],
}
CALLS = ("Version", "Status", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus", "ListPodSandbox",
         "CreateContainer", "StartContainer", "ContainerStatus", "RemoveContainer")
CONTAINER_EXITED = 2  # ContainerState CONTAINER_EXITED
_SCALARS = {"string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
            "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
            "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
            "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32}


def _build() -> dict[str, Any]:
    Field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="istio_init_tests_cri.proto", package=PACKAGE, syntax="proto3")
    for name, fields in MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            label = Field.LABEL_OPTIONAL
            if kind.startswith("repeated "):
                label, kind = Field.LABEL_REPEATED, kind.split(" ", 1)[1]
            entry = message.field.add(name=field_name, number=number, label=label)
            if kind == "map":
                entry_name = "".join(part.title() for part in field_name.split("_")) + "Entry"
                nested = message.nested_type.add(name=entry_name)
                nested.options.map_entry = True
                nested.field.add(name="key", number=1, type=Field.TYPE_STRING, label=Field.LABEL_OPTIONAL)
                nested.field.add(name="value", number=2, type=Field.TYPE_STRING, label=Field.LABEL_OPTIONAL)
                entry.label, entry.type, entry.type_name = Field.LABEL_REPEATED, Field.TYPE_MESSAGE, \
                    f".{PACKAGE}.{name}.{entry_name}"
            elif kind in _SCALARS:
                entry.type = _SCALARS[kind]
            else:
                entry.type, entry.type_name = Field.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in MESSAGES}


M = _build()


class RuntimeClient:
    """The RuntimeService over containerd's socket; each call has a deadline."""

    def __init__(self, address: str, timeout: float = 60) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        assert method in CALLS
        stub = self.channel.unary_unary(SERVICE + method, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=M[f"{method}Response"].FromString)
        return stub(request, timeout=timeout or self.timeout)

    def version(self, timeout: float = 2) -> Any:
        return self.call("Version", M["VersionRequest"](version="v1"), timeout)

    def cni_config(self) -> Any:
        """The CNI configuration the runtime has loaded (containerd's verbose Status, info "cniconfig")."""
        return json.loads(self.call("Status", M["StatusRequest"](verbose=True), 10).info["cniconfig"])

    def run_pod_sandbox(self, config: Any) -> str:
        return str(self.call("RunPodSandbox", M["RunPodSandboxRequest"](config=config)).pod_sandbox_id)

    def stop_pod_sandbox(self, sandbox: str) -> None:
        self.call("StopPodSandbox", M["StopPodSandboxRequest"](pod_sandbox_id=sandbox))

    def remove_pod_sandbox(self, sandbox: str) -> None:
        self.call("RemovePodSandbox", M["RemovePodSandboxRequest"](pod_sandbox_id=sandbox))

    def pod_sandbox_status(self, sandbox: str) -> Any:
        return self.call("PodSandboxStatus", M["PodSandboxStatusRequest"](pod_sandbox_id=sandbox, verbose=True))

    def list_pod_sandboxes(self) -> list[Any]:
        return list(self.call("ListPodSandbox", M["ListPodSandboxRequest"]()).items)

    def create_container(self, sandbox: str, config: Any, sandbox_config: Any) -> str:
        return str(self.call("CreateContainer", M["CreateContainerRequest"](
            pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config)).container_id)

    def start_container(self, container: str) -> None:
        self.call("StartContainer", M["StartContainerRequest"](container_id=container))

    def container_status(self, container: str) -> Any:
        return self.call("ContainerStatus", M["ContainerStatusRequest"](container_id=container)).status

    def remove_container(self, container: str) -> None:
        self.call("RemoveContainer", M["RemoveContainerRequest"](container_id=container))
