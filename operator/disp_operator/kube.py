"""The operator's few Kubernetes calls besides kopf's own watching: create and delete stage Jobs,
look at the credentials Secret, write the PurificationJob's status, delete a finished one whose
time to live is over. Blocking (the official client);
the handlers call it from worker threads. The credentials are the ones kopf logs in with: the pod's
service account in a cluster, $KUBECONFIG elsewhere (read when the operator starts, not at import)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import kubernetes
from kubernetes.client.exceptions import ApiException

from disp_operator.kueue import KUEUE_GROUP, KUEUE_VERSION
from disp_operator.naming import GROUP, PLURAL, VERSION

USER_AGENT = "disp-operator"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def client_configuration() -> kubernetes.client.Configuration:
    config = kubernetes.client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SERVICE_ACCOUNT_TOKEN):
        # Refreshes the (expiring, bound) service-account token from its file as it rotates.
        kubernetes.config.load_incluster_config(client_configuration=config)
    else:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=config)
    return config


class KubeApi:
    def __init__(self, config: kubernetes.client.Configuration):
        self.client = kubernetes.client.ApiClient(config)
        self.client.user_agent = USER_AGENT  # tells our calls apart in audit logs
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    def create_job(self, manifest: dict[str, Any]) -> bool:
        """Create a Job; False if one of that name exists already (names are deterministic)."""
        return _create(self.batch.create_namespaced_job, manifest)

    def create_service(self, manifest: dict[str, Any]) -> bool:
        """Create a Service; False if it exists already (one per job, shared by its attempts)."""
        return _create(self.core.create_namespaced_service, manifest)

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a Job already gone is fine."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_purification_job(self, namespace: str, name: str, uid: Optional[str]) -> bool:
        """Delete the PurificationJob with this uid (a precondition: never a newer one of the same
        name); False when it is gone already or is another object now."""
        options = kubernetes.client.V1DeleteOptions(
            propagation_policy="Background",
            preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=options)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or a new object of that name (uid precondition)
                return False
            raise

    def secret_data(self, namespace: str, name: str) -> Optional[dict[str, str]]:
        """The Secret's base64 data, or None when it does not exist. Never logged."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(secret.data or {})

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Whether the Secret exists, asked for its metadata only (PartialObjectMetadata): what it
        holds (a signing key) never reaches the operator."""
        try:
            response = self.core.read_namespaced_secret(name, namespace, _preload_content=False,
                                                        _headers={"Accept": PARTIAL_METADATA})
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        response.release_conn()
        return True

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    # -- a queued run's Kueue Workload (kueue.py) ----------------------------------------------------
    def workload(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return self.custom.get_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_workload(self, manifest: dict[str, Any]) -> bool:
        return _create(lambda namespace, body: self.custom.create_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", body), manifest)

    def replace_workload_status(self, workload: dict[str, Any], status: dict[str, Any]) -> None:
        """Write the Workload's status as read plus the change (its resourceVersion: a concurrent
        write by Kueue makes this one fail, and the next pass decides again)."""
        meta = workload["metadata"]
        body = {"apiVersion": workload["apiVersion"], "kind": workload["kind"],
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": meta["resourceVersion"]},
                "spec": workload["spec"], "status": status}
        self.custom.replace_namespaced_custom_object_status(KUEUE_GROUP, KUEUE_VERSION, meta["namespace"],
                                                            "workloads", meta["name"], body)

    def delete_workload(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def workload_priority(self, name: str) -> Optional[int]:
        """The value of the WorkloadPriorityClass `name`, or None when there is none."""
        try:
            found = self.custom.get_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "workloadpriorityclasses", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return int(found.get("value", 0))

    def resource_flavor(self, name: str) -> Optional[dict[str, Any]]:
        try:
            return self.custom.get_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "resourceflavors", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def close(self) -> None:
        self.client.close()


def _create(create: Callable[[str, dict[str, Any]], Any], manifest: dict[str, Any]) -> bool:
    """Create an object; False when one of its (deterministic) name exists: creating twice is harmless."""
    try:
        create(manifest["metadata"]["namespace"], manifest)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise
