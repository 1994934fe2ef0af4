"""What an end-to-end test does with the real control plane, as a cluster admin with `kubectl`
would: install the CRD, install the chart's RBAC and ServiceAccount, create a namespace of its own
with the S3 credentials Secret, apply PurificationJobs, watch them, and read the API server's
audit log. One `Cluster` per test, in a namespace of its own (the control plane is shared by the
session), deleted when the test ends."""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

from tests.harness.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "purificationjobs.disp.dev.yaml"
GROUP, VERSION, PLURAL = "disp.dev", "v1alpha1", "purificationjobs"
OPERATOR_NAMESPACE = "disp-system"  # the chart's release namespace in the tests


def install_crd(plane: ControlPlane, timeout: float = 60) -> dict[str, Any]:
    """Apply the CRD (created, or replaced when it exists) and wait until it is Established."""
    api = kubernetes.client.ApiextensionsV1Api(plane.admin())
    crd = yaml.safe_load(CRD.read_text())
    name = crd["metadata"]["name"]
    try:
        api.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = api.read_custom_resource_definition(name)
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        api.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = api.api_client.sanitize_for_serialization(api.read_custom_resource_definition(name))
        conditions = {c["type"]: c for c in (raw.get("status") or {}).get("conditions") or []}
        if conditions.get("Established", {}).get("status") == "True":
            return raw
        if conditions.get("NamesAccepted", {}).get("status") == "False":
            raise AssertionError(f"the API server did not accept the CRD's names: {conditions['NamesAccepted']}")
        time.sleep(0.2)
    raise AssertionError(f"the CRD was not Established within {timeout}s: {raw.get('status')}")


def apply(client: kubernetes.client.ApiClient, doc: dict[str, Any]) -> None:
    """Create an object, or replace it when it exists (what `kubectl apply` ends with)."""
    dynamic = kubernetes.dynamic.DynamicClient(client)
    resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    namespace = doc["metadata"].get("namespace") if resource.namespaced else None
    try:
        resource.create(body=doc, namespace=namespace)
    except kubernetes.dynamic.exceptions.ConflictError:
        current = resource.get(name=doc["metadata"]["name"], namespace=namespace)
        doc = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current.metadata.resourceVersion}}
        resource.replace(body=doc, namespace=namespace)


class Cluster:
    def __init__(self, plane: ControlPlane, namespace_prefix: str = "ml-team"):
        self.plane = plane
        self.client = plane.admin()
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.namespace = f"{namespace_prefix}-{uuid.uuid4().hex[:6]}"
        self.namespaces: list[str] = []
        self.audit_since = plane.audit_offset()  # the session's log is shared: this test's calls come after
        self.create_namespace(self.namespace)

    def close(self) -> None:
        """Delete this test's namespaces. Their PurificationJobs go first, at once (finalizers
        dropped, as an admin cleaning up after an operator does): the namespace controller deletes
        the rest in the background, and a later test's cluster-wide operator must not see jobs of
        this one meanwhile."""
        for namespace in self.namespaces:
            for name, job in self.list_jobs(namespace).items():
                if job["metadata"].get("finalizers"):
                    self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                               {"metadata": {"finalizers": None}})
                try:
                    self.delete_job(namespace, name)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
            deadline = time.monotonic() + 30
            while self.list_jobs(namespace) and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                self.core.delete_namespace(namespace, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise
        self.client.close()

    # --- what a cluster admin does --------------------------------------------------------------------
    def create_namespace(self, name: str, delete_at_end: bool = True) -> str:
        """Create a namespace unless it exists; one this test made goes when the test ends (the
        operator's own namespace stays for the session, as an installed operator's does)."""
        try:
            self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise
            return name
        if delete_at_end:
            self.namespaces.append(name)
        return name

    def apply_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        apply(self.client, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    def apply_all(self, docs: list[dict[str, Any]]) -> None:
        """Apply objects (a rendered chart's), making the namespaces they name first."""
        for doc in docs:
            namespace = doc["metadata"].get("namespace")
            if namespace:
                self.create_namespace(namespace, delete_at_end=namespace != OPERATOR_NAMESPACE)
            apply(self.client, doc)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount (the TokenRequest API, what the kubelet mounts)."""
        request = self.core.create_namespaced_service_account_token(
            name, namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": seconds}})
        return request.status.token

    # --- PurificationJobs -------------------------------------------------------------------------------
    def create_job(self, manifest: dict[str, Any]) -> str:
        """Apply a PurificationJob; its uid, which the API server assigns."""
        created = self.custom.create_namespaced_custom_object(GROUP, VERSION, manifest["metadata"]["namespace"],
                                                              PLURAL, manifest)
        return created["metadata"]["uid"]

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   {"spec": {"policy": {"suspend": suspend}}})

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def list_jobs(self, namespace: str) -> dict[str, dict[str, Any]]:
        """The PurificationJobs of a namespace, by name."""
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return {item["metadata"]["name"]: item for item in items}

    def delete_job(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def jobs(self, namespace: str) -> list[dict[str, Any]]:
        """The batch/v1 Jobs of a namespace."""
        return [self.client.sanitize_for_serialization(j) for j in self.batch.list_namespaced_job(namespace).items]

    def pods(self, namespace: str) -> list[dict[str, Any]]:
        return [self.client.sanitize_for_serialization(p) for p in self.core.list_namespaced_pod(namespace).items]

    def events(self, namespace: str, kind: str = "PurificationJob") -> list[dict[str, Any]]:
        """The Events about objects of `kind` (the Job controller and the scheduler post theirs
        about Jobs and pods in the same namespace)."""
        events = [self.client.sanitize_for_serialization(e) for e in self.core.list_namespaced_event(namespace).items]
        return [e for e in events if (e.get("involvedObject") or {}).get("kind") == kind]

    def wait_for(self, namespace: str, name: str, predicate, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.get(namespace, name)
            if predicate(body):
                return body
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {body.get('status')}")

    def audit(self, user: str) -> Iterator[dict[str, Any]]:
        """This test's audit log events of one user (e.g. system:serviceaccount:disp-system:disp-operator)."""
        return (event for event in self.plane.audit_events(self.audit_since)
                if event.get("user", {}).get("username") == user)
