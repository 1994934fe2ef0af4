"""A real MinIO server on loopback (built from its Go module by tools/clustertools/build.sh), the S3
endpoint of every test that talks to object storage. One server per test session; a test that needs
a server to go away and come back (a crash mid-upload) starts its own and restarts it on the same
folder and port.

The tests share one identity, the server's root user (MinIO wants a secret of at least 8
characters). Tests keep apart by bucket or by key prefix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

from tests.harness.controlplane import free_port
from tests.harness.process import http_ok, stop, wait_ready
from tests.harness.tools import module_version

S3_ACCESS, S3_SECRET = "disp-test-access", "disp-test-secret-6f2b"


class MinioError(RuntimeError):
    """The server did not come up; the message ends with its log's tail."""


class MinioServer:
    """`minio server FOLDER` on a loopback address (127.0.0.1 unless told), its console off. `start` waits until the server says it is
    ready (GET /minio/health/ready) and may be called again after `stop`, on the same port."""

    def __init__(self, binary: Path, folder: Path, port: Optional[int] = None, address: str = "127.0.0.1"):
        self.binary, self.folder = binary, folder
        self.data = folder / "data"
        self.log = folder / "minio.log"
        self.address = address  # any of 127.0.0.0/8: a Service's own address, as kube-proxy gives one
        self.port = port or free_port()
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self, timeout: float = 60) -> "MinioServer":
        self.data.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.folder),
               "MINIO_ROOT_USER": S3_ACCESS, "MINIO_ROOT_PASSWORD": S3_SECRET,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_CI_CD": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "server", str(self.data), "--address", self.endpoint,
                 "--console-address", f"127.0.0.1:{free_port()}", "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_ready("minio", self.process, self.log, lambda: http_ok(f"http://{self.endpoint}/minio/health/ready"),
                   timeout, MinioError)
        return self

    def stop(self) -> None:
        stop(self.process)

    def version(self) -> str:
        return module_version(self.binary)
