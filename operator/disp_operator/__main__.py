"""`disp-operator`: run the PurificationJob operator.

Scope: --all-namespaces (default) or one --namespace per watched namespace. The operator's other
settings come from its environment (see disp_operator.config; the Helm chart sets them)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from disp_api.version import VERSION

    parser = argparse.ArgumentParser(prog="disp-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"disp-operator {VERSION}")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeat for several; glob patterns allowed)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (default: $DISP_METRICS_PORT or 9090; 0 turns it off)")
    parser.add_argument("--liveness-port", type=int, default=8080,
                        help="port of the /healthz liveness and readiness endpoint (0 turns it off)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per line, with the PurificationJob's namespace and name under "
                             "'object' where a line is about one (for log pipelines)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            print(f"disp-operator: error: --metrics-port {args.metrics_port} is not a port", file=sys.stderr)
            return 2
        os.environ["DISP_METRICS_PORT"] = str(args.metrics_port)
    command = ["run", "--standalone", "-m", "disp_operator.handlers"]
    command += [f"--namespace={ns}" for ns in args.namespace] or ["--all-namespaces"]
    if args.liveness_port:
        command.append(f"--liveness=http://0.0.0.0:{args.liveness_port}/healthz")
        os.environ["DISP_LIVENESS_PORT"] = str(args.liveness_port)  # served while waiting to lead
    if args.log_format == "json":
        command.append("--log-format=json")
    if args.verbose:
        command.append("--verbose")
    from kopf.cli import main as kopf_cli  # kopf's own CLI: signal handling, logging, liveness

    kopf_cli.main(args=command, prog_name="disp-operator")  # exits with the operator's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
