"""A real Kubernetes control plane on loopback for the end-to-end tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, built from their Go modules by
tools/controlplane/build.sh (`make k8s`), each started here as its own process.

What the fixture sets up is what a small production cluster has, on 127.0.0.1 only:
- certificates and the service-account signing keys made fresh (pki.py);
- the API server with client-certificate and service-account-token authentication,
  `--authorization-mode=Node,RBAC`, its default admission plugins plus NodeRestriction, and an
  audit log (JSON, level Metadata: who did what to which object, never a Secret's content);
- the controller-manager with `--use-service-account-credentials` (each controller acts under its
  own service account, as RBAC's bootstrap roles expect) and the scheduler, both with their own
  client identities and no leader election.

No kubelet runs: tests/harness/node_agent.py registers the nodes and runs the pods the scheduler
binds to them."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import kubernetes
import yaml

from disp_runner.net import free_port
from tests.harness.pki import ClusterPKI, KeyPair
from tests.harness.process import build_folder, log_tail, stop

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "controlplane" / "build.sh"
ADMIN_USER = "disp-test-admin"  # in group system:masters: what `kubectl` as a cluster admin is
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
CLIENTS = ("kubectl",)  # built with the components, from the same Kubernetes release

AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}


class ControlPlaneError(RuntimeError):
    """A component did not build or come up; the message names it and ends with its log's tail."""


def build_binaries() -> Path:
    """The folder holding the four components and kubectl (built once, behind a stamp, by build.sh)."""
    return build_folder(BUILD_SCRIPT, COMPONENTS + CLIENTS, ControlPlaneError)


@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self, what: str) -> ControlPlaneError:
        state = "is running" if self.alive() else f"exited with code {self.process.returncode}"
        return ControlPlaneError(f"{self.name} {what} ({state}); last lines of {self.log}:\n{log_tail(self.log)}")

    def stop(self, grace: float = 10) -> None:
        stop(self.process, grace)


def kubeconfig(path: Path, server: str, ca: Path, *, client: Optional[KeyPair] = None,
               token: Optional[str] = None, user: str = "user", embed_ca: bool = False) -> Path:
    """A kubeconfig for one identity: a client certificate or a bearer token; `embed_ca` puts the
    CA in the file itself (for a container that sees no host path)."""
    credentials: dict[str, Any] = {}
    if client is not None:
        credentials = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        credentials = {"token": token}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "disp-test", "cluster": {"server": server, **(
            {"certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()} if embed_ca else
            {"certificate-authority": str(ca)})}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "disp-test", "user": user}}]}))
    path.chmod(0o600)
    return path


def api_client(config_file: Path) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(config_file), client_configuration=config)
    return kubernetes.client.ApiClient(config)


@dataclass
class ControlPlane:
    folder: Path
    binaries: Path
    components: dict[str, Component] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pki = ClusterPKI(self.folder / "pki")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.audit_log = self.folder / "audit.log"
        self.admin_kubeconfig = kubeconfig(self.folder / "admin.kubeconfig", self.url, self.pki.ca,
                                           client=self.pki.client("admin", ADMIN_USER, ("system:masters",)),
                                           user=ADMIN_USER)

    # --- start and stop ---------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        began = time.monotonic()
        deadline = began + timeout
        etcd_url = self._start_etcd(deadline)
        self._start_apiserver(etcd_url, deadline)
        for name, user in (("kube-controller-manager", "system:kube-controller-manager"),
                           ("kube-scheduler", "system:kube-scheduler")):
            config = kubeconfig(self.folder / f"{name}.kubeconfig", self.url, self.pki.ca,
                                client=self.pki.client(name, user), user=user)
            self._spawn(name, self._component_flags(name, config))
        self._wait_for_controllers(deadline)
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        for name in reversed(COMPONENTS):
            component = self.components.get(name)
            if component is not None:
                component.stop()

    def _spawn(self, name: str, args: list[str]) -> Component:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(self.binaries / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        component = Component(name, process, log)
        self.components[name] = component
        return component

    def _start_etcd(self, deadline: float) -> str:
        client, peer = free_port(), free_port()
        etcd = self._spawn("etcd", [
            "--name=disp-test", f"--data-dir={self.folder / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}", f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=disp-test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",  # a throw-away store: durability buys nothing, fsync costs seconds
            "--log-level=warn"])
        url = f"http://127.0.0.1:{client}"
        self._wait(etcd, deadline, "did not report healthy", lambda: _get(f"{url}/health").get("health") == "true")
        return url

    def _start_apiserver(self, etcd_url: str, deadline: float) -> None:
        serving = self.pki.serving("apiserver", ("127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
                                                 "kubernetes.default.svc", "10.96.0.1"))
        sa = self.pki.service_account_keys()
        self.service_account_keys = sa
        policy = self.folder / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        apiserver = self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={self.pki.ca}",
            f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
            f"--service-account-key-file={sa.cert}", f"--service-account-signing-key-file={sa.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",  # added to the default plugins
            # The `kubernetes` Service's endpoints would name 127.0.0.1, which EndpointSlice
            # validation refuses; a pod reaches the API server through the node agent's stand-in
            # for that Service instead (its variables, and a relay at port 443).
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-mode=blocking",  # each call is in the log when it returns
            "--profiling=false", "--v=1"])
        self._wait(apiserver, deadline, "did not become ready", self._ready)

    def _component_flags(self, name: str, config: Path) -> list[str]:
        common = [f"--kubeconfig={config}", "--leader-elect=false", "--secure-port=0", "--v=1"]
        if name == "kube-scheduler":
            return common
        return [*common, "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.service_account_keys.key}",
                f"--root-ca-file={self.pki.ca}"]

    def _ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        admin = self.pki.folder / "admin"
        context.load_cert_chain(f"{admin}.crt", f"{admin}.key")
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_for_controllers(self, deadline: float) -> None:
        """The controller-manager works once its service-account controller has made the `default`
        ServiceAccount of namespace default (pods cannot be created without it); the scheduler
        only needs to be running, its work shows when the first pod is bound."""
        core = kubernetes.client.CoreV1Api(self.admin())

        def default_account() -> bool:
            try:
                core.read_namespaced_service_account("default", "default")
                return True
            except kubernetes.client.ApiException:
                return False
        self._wait(self.components["kube-controller-manager"], deadline,
                   "made no default ServiceAccount", default_account)
        scheduler = self.components["kube-scheduler"]
        if not scheduler.alive():
            raise scheduler.failure("did not start")

    def _wait(self, component: Component, deadline: float, what: str, ready) -> None:
        while time.monotonic() < deadline:
            if not component.alive():
                raise component.failure("exited while starting")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.2)
        raise component.failure(what)

    # --- what the tests use -----------------------------------------------------------------------
    def admin(self) -> kubernetes.client.ApiClient:
        """A client with cluster-admin rights (the tests' own `kubectl`)."""
        return api_client(self.admin_kubeconfig)

    def client_kubeconfig(self, stem: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a client-certificate identity (e.g. a node: system:node:NAME)."""
        return kubeconfig(self.folder / f"{stem}.kubeconfig", self.url, self.pki.ca,
                          client=self.pki.client(stem, user, groups), user=user)

    def token_kubeconfig(self, stem: str, token: str, user: str, embed_ca: bool = False) -> Path:
        return kubeconfig(self.folder / f"{stem}.kubeconfig", self.url, self.pki.ca, token=token, user=user,
                          embed_ca=embed_ca)

    def versions(self) -> dict[str, str]:
        """What each running component is: the executable its process runs (read from /proc, so a
        stand-in cannot pass for it) and the version that executable reports."""
        found = {}
        for name, component in self.components.items():
            if not component.alive():
                raise component.failure("is not running")
            executable = Path(os.readlink(f"/proc/{component.process.pid}/exe"))
            if executable.name != name:
                raise ControlPlaneError(f"process {component.process.pid} runs {executable}, not {name}")
            out = subprocess.run([str(executable), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.strip().splitlines()
            found[name] = out[0] if out else "?"
        return found

    def audit_offset(self) -> int:
        """Where the audit log ends now: audit_events(since=) reads only what comes after."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit_events(self, since: int = 0) -> Iterator[dict[str, Any]]:
        """The audit log's events, oldest first, from byte offset `since`."""
        with self.audit_log.open() as log:
            log.seek(since)
            for line in log:
                if line.strip():
                    yield json.loads(line)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_control_plane(folder: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(folder, build_binaries())
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
