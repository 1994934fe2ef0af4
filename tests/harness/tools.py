"""The command-line tools a platform team installs and operates with, as real binaries: kubectl (built
with the control plane, tools/controlplane/build.sh), helm, kustomize, the MinIO server and Kueue's
controller manager (tools/clustertools/build.sh, `make k8s`). `Shell` runs commands the way a
README's reader does: a bash with those tools on PATH, KUBECONFIG set to an identity of the control
plane, and Helm's state in a folder of its own."""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from tests.harness.controlplane import REPO, build_binaries
from tests.harness.process import build_folder

BUILD_SCRIPT = REPO / "tools" / "clustertools" / "build.sh"
CLUSTER_TOOLS = ("helm", "kustomize", "minio", "kueue")


class ToolError(RuntimeError):
    """A tool did not build, or a command failed; the message holds its output's tail."""


def build_cluster_tools() -> Path:
    """The folder holding helm, kustomize, minio and kueue (built once, behind a stamp)."""
    return build_folder(BUILD_SCRIPT, CLUSTER_TOOLS, ToolError)


@dataclass(frozen=True)
class Toolbox:
    """Where each tool lies."""

    kubernetes: Path  # kubectl (and the control plane's components)
    cluster: Path  # helm, kustomize, minio, kueue

    @classmethod
    def build(cls) -> "Toolbox":
        return cls(build_binaries(), build_cluster_tools())

    def path(self, tool: str) -> Path:
        return (self.cluster if tool in CLUSTER_TOOLS else self.kubernetes) / tool

    def version(self, tool: str) -> str:
        return module_version(self.path(tool))


@functools.lru_cache(maxsize=1)
def toolbox() -> Toolbox:
    """The tools, built on first use (a no-op after `make k8s`)."""
    return Toolbox.build()


def module_version(binary: Path) -> str:
    """The module and version a Go binary was built from, as the binary itself records them (`go
    version -m`): what was built, whatever the program prints about itself (MinIO built outside
    its release process calls itself DEVELOPMENT.GOGET)."""
    result = subprocess.run(["go", "version", "-m", str(binary)], capture_output=True, text=True, timeout=60)
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["mod"] and len(fields) >= 3:
            return f"{fields[1]} {fields[2]}"
    return "unknown"


@dataclass
class Shell:
    """bash with the tools on PATH and one cluster identity, run from the repository's root (where a
    README's reader runs its commands)."""

    tools: Toolbox
    kubeconfig: Path
    home: Path  # HOME, and Helm's cache, configuration and data
    extra_env: Mapping[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": f"{self.tools.kubernetes}:{self.tools.cluster}:{os.environ['PATH']}",
            "HOME": str(self.home), "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(self.home / "helm-cache"), "HELM_CONFIG_HOME": str(self.home / "helm-config"),
            "HELM_DATA_HOME": str(self.home / "helm-data"), "LANG": "C.UTF-8", **self.extra_env}

    def run(self, script: str, *, check: bool = True, timeout: float = 300,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run `script` with `bash -euo pipefail`; with `check`, a failure raises with its output."""
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                                env=self.env, cwd=cwd or REPO, timeout=timeout)
        if check and result.returncode != 0:
            raise ToolError(f"exit {result.returncode} from:\n{script}\n--- stdout:\n{result.stdout[-3000:]}"
                            f"\n--- stderr:\n{result.stderr[-3000:]}")
        return result
