"""Fine-tuning on several processes: one per GPU of a pod, on one pod or several (nodes).

The processes are started by torch's elastic launcher, the engine behind `torchrun`, with its
static rendezvous: node i of M is told its rank and node 0 hosts the rendezvous store at
MASTER_ADDR:MASTER_PORT (the variables Kubeflow's Trainer and JobSet give their pods). Ranks are
therefore fixed, and global rank 0, which writes checkpoints and the purified model, always runs
on node 0, the pod that publishes the stage.

Every process sees every global batch and trains on its own contiguous part of it (`batch_share`);
its loss is weighted by the part's share of the batch, so DDP's gradient average equals the
one-process gradient of the whole batch: the global batch, learning-rate schedule and results are
those of the one-process run, up to the order of floating-point reductions."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from disp_runner.errors import DegenerateResultError, TransientError, UserInputError
from disp_runner.net import free_port

MASTER_ADDR_ENV, MASTER_PORT_ENV = "MASTER_ADDR", "MASTER_PORT"
DEFAULT_MASTER_PORT = 29500
RENDEZVOUS_TIMEOUT_S = 900  # nodes of an Indexed Job may start minutes apart (image pulls, scheduling)


@dataclass(frozen=True)
class Topology:
    """Where the processes of one fine-tune run: `nodes` pods of `processes_per_node` each; this
    process's pod is `node_rank`."""

    nodes: int = 1
    node_rank: int = 0
    processes_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, chosen here (one node only)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.processes_per_node < 1:
            raise UserInputError(f"--nodes {self.nodes} / --processes {self.processes_per_node}: need at least 1")
        if not 0 <= self.node_rank < self.nodes:
            raise UserInputError(f"--node-rank {self.node_rank}: need 0 <= node rank < --nodes {self.nodes}")

    @classmethod
    def from_flags(cls, processes: int | None, nodes: int, node_rank: int,
                   environ: Mapping[str, str] = os.environ) -> "Topology":
        """The topology `disp run` flags describe. Several nodes need the rendezvous address from
        MASTER_ADDR and MASTER_PORT (the operator sets both; so do JobSet and Trainer)."""
        if processes is None:  # one process per visible GPU, one on a CPU-only pod
            processes = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
        if nodes == 1:
            return cls(1, node_rank, processes)
        addr, port = environ.get(MASTER_ADDR_ENV, "").strip(), environ.get(MASTER_PORT_ENV, "").strip()
        if not addr:
            raise UserInputError(f"--nodes {nodes}: set {MASTER_ADDR_ENV} to node 0's address "
                                 "(the operator does; so do JobSet and Kubeflow Trainer)")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise UserInputError(f"{MASTER_PORT_ENV}={port[:20]!r}: expected a TCP port")
        return cls(nodes, node_rank, processes, addr, int(port) if port else DEFAULT_MASTER_PORT)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def publishes(self) -> bool:
        """Node 0 holds global rank 0, so it writes the stage's output."""
        return self.node_rank == 0


def batch_share(rows: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Process `rank`'s contiguous part of one global batch: (its rows, their positions in the
    batch, the part's share of the batch). A process left without rows (a last batch smaller than
    the world) trains on the batch's first row at weight 0, so it still joins the gradient sum."""
    positions = torch.tensor_split(torch.arange(len(rows)), world)[rank]
    if len(positions) == 0:
        return rows[:1], torch.arange(1), 0.0
    return rows[positions], positions, len(positions) / len(rows)


# -- failures cross the process boundary as (kind, message): the CLI's exit code depends on the kind
_KINDS: dict[str, Callable[[str], Exception]] = {
    "user": UserInputError, "degenerate": DegenerateResultError, "transient": TransientError}


def _kind(exc: BaseException) -> str:
    if isinstance(exc, DegenerateResultError):
        return "degenerate"
    if isinstance(exc, UserInputError):
        return "user"
    if isinstance(exc, (TransientError, MemoryError)):
        return "transient"
    return "internal"


def _worker(fn: Callable[..., Any], error_dir: str, args: tuple) -> Any:
    """What each launched process runs: its GPU chosen, then `fn(*args)`; a failure is written
    where the launching process finds it, so the pod's exit code still says what went wrong."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        return fn(*args)
    except BaseException as exc:
        record = {"kind": _kind(exc), "message": str(exc) or type(exc).__name__, "type": type(exc).__name__}
        Path(error_dir, f"rank-{os.environ.get('RANK', '?')}.json").write_text(json.dumps(record))
        raise


def launch(topology: Topology, run_id: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in `topology.processes_per_node` new processes on this node, joined with the
    other nodes' into one process group; returns global rank 0's result on node 0, None elsewhere.
    The threads of the pod's CPU quota are shared out between the processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = topology.master_port or free_port()
    config = LaunchConfig(
        min_nodes=topology.nodes, max_nodes=topology.nodes, nproc_per_node=topology.processes_per_node,
        run_id=run_id, rdzv_backend="static", rdzv_endpoint=f"{topology.master_addr}:{port}",
        rdzv_configs={"rank": topology.node_rank, "timeout": RENDEZVOUS_TIMEOUT_S},
        max_restarts=0,  # a failed process fails the pod; the operator retries it from the last checkpoint
        start_method="spawn")
    threads = max(1, torch.get_num_threads() // topology.processes_per_node)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # the workers inherit them
    with tempfile.TemporaryDirectory(prefix="disp-workers-") as error_dir:
        try:
            results = elastic_launch(config, _worker)(fn, error_dir, args)
        except ChildFailedError as exc:
            raise _failure(Path(error_dir), exc) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return results.get(0)


def _failure(error_dir: Path, exc: Exception) -> Exception:
    """The most telling failure of the workers: a bad input beats everything, then a transient one;
    a process that died without a word (killed by the kernel) counts as transient."""
    records = [json.loads(p.read_text()) for p in sorted(error_dir.glob("rank-*.json"))]
    for kind in ("user", "degenerate", "transient", "internal"):
        for record in records:
            if record["kind"] == kind:
                if kind == "internal":
                    return RuntimeError(f"a fine-tune process failed: {record['type']}: {record['message']}")
                return _KINDS[kind](record["message"])
    detail = (str(exc).strip().splitlines() or ["killed"])[0][:200]
    return TransientError(f"a fine-tune process died without reporting an error ({detail}); out of memory?")
