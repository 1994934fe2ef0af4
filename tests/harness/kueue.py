"""Kueue's controller manager (sigs.k8s.io/kueue, built by tools/clustertools/build.sh) against the
test control plane, with Kueue's own CRDs from the same module version.

How it differs from a Kueue installed by its manifests, and why:
- it runs as a process with the cluster admin's kubeconfig instead of a pod with Kueue's RBAC (the
  project's own RBAC is what the tests check, not Kueue's);
- its admission webhooks are served (with a certificate of the test PKI) but not registered with
  the API server, which cannot reach a Service without a cluster network: what they do for a
  batch/v1 Job (suspend it at creation when it names a queue) the operator already does itself,
  and Kueue's controllers, which do the queueing and admission, are unaffected;
- leader election is off (one manager); the batch/job integration is on, and the operator's
  PurificationJob is registered as an external framework (as the chart's README tells a team to);
- without Kueue's internal certificate management (which would want a webhook Service and CRD
  conversion webhooks), Kueue reads a metrics certificate from the fixed path
  /etc/kueue/metrics/certs: the manager runs in a mount namespace of its own in which a test
  certificate is bind-mounted there (on the host only that empty folder is created)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import yaml

from disp_operator.kueue import EXTERNAL_FRAMEWORK
from tests.harness.controlplane import ControlPlane, free_port
from tests.harness.process import http_ok, stop, wait_ready
from tests.harness.tools import BUILD_SCRIPT, ToolError

KUEUE_API = "kueue.x-k8s.io/v1beta2"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # cmd/kueue/main.go, without internal certificates


def kueue_module() -> tuple[str, Path]:
    """The Kueue version the build script pins, and that module's source (its CRDs)."""
    spec = next(line.strip().strip('"').split()[1] for line in BUILD_SCRIPT.read_text().splitlines()
                if line.strip().startswith('"kueue '))
    result = subprocess.run(["go", "mod", "download", "-json", spec.replace("/cmd/kueue@", "@")],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise ToolError(f"go mod download {spec}: {result.stderr.strip()}")
    return spec.rsplit("@", 1)[1], Path(json.loads(result.stdout)["Dir"])


class KueueManager:
    def __init__(self, plane: ControlPlane, binary: Path, folder: Path):
        self.plane, self.binary, self.folder = plane, binary, folder
        self.version, self.source = kueue_module()
        self.health_port = free_port()
        self.log = folder / "kueue.log"
        self.process: Optional[subprocess.Popen] = None

    def install_crds(self, kubectl: Path) -> None:
        crds = self.source / "config" / "components" / "crd" / "bases"
        result = subprocess.run([str(kubectl), "apply", "--server-side", "-f", str(crds)], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "KUBECONFIG": str(self.plane.admin_kubeconfig)})
        if result.returncode != 0:
            raise ToolError(f"Kueue's CRDs were refused: {result.stderr.strip()[-2000:]}")
        subprocess.run([str(kubectl), "wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds)],
                       capture_output=True, text=True, timeout=120, check=True,
                       env={**os.environ, "KUBECONFIG": str(self.plane.admin_kubeconfig)})

    def start(self, timeout: float = 120) -> "KueueManager":
        self.folder.mkdir(parents=True, exist_ok=True)
        certs = self.folder / "certs"
        certs.mkdir(exist_ok=True)
        pair = self.plane.pki.serving("kueue-webhook", ("127.0.0.1", "kueue-webhook-service.kueue-system.svc"))
        (certs / "tls.crt").write_bytes(pair.cert.read_bytes())
        (certs / "tls.key").write_bytes(pair.key.read_bytes())
        config = self.folder / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            # The operator's PurificationJob is an external framework: it makes the run's Workload,
            # and Kueue holds back (suspends) a stage Job of a run whose Workload is not admitted.
            "integrations": {"frameworks": ["batch/job"], "externalFrameworks": [EXTERNAL_FRAMEWORK]},
        }))
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind "$0" {METRICS_CERTS} && exec "$@"', str(certs),
                 str(self.binary), f"--config={config}", f"--kubeconfig={self.plane.admin_kubeconfig}",
                 # the on-demand visibility API server needs an APIService and certificates of its own
                 "--feature-gates=VisibilityOnDemand=false"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready("kueue", self.process, self.log, lambda: http_ok(f"http://127.0.0.1:{self.health_port}/readyz"),
                   timeout, ToolError)
        return self

    def stop(self) -> None:
        stop(self.process, grace=15)
