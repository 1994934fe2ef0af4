"""Builders shared by the operator's unit tests: a valid job body and observed stage Jobs/pods."""

from __future__ import annotations

from typing import Any

import pytest

from disp_api import PurificationJob
from tests.jobs import job_document, with_overrides

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/compromised"},
    "dataset": {"uri": "s3://datasets/train"},
    "output": {"uri": "s3://runs"},
    "storage": {"endpoint": "minio:9000", "secure": False, "credentialsSecret": {"name": "minio"}},
}


def job_body(**spec_overrides: Any) -> dict[str, Any]:
    """The job as the API server hands it to the operator (uid and generation set)."""
    return job_document(with_overrides(BASE_SPEC, spec_overrides), "purify", "team",
                        uid="0c1d2e3f-0000-4000-8000-000000000001", generation=1)


def make_job(**spec_overrides: Any) -> PurificationJob:
    body = job_body(**spec_overrides)
    return PurificationJob.model_validate({k: v for k, v in body.items()} | {
        "metadata": {k: v for k, v in body["metadata"].items() if k != "generation"}})


def k8s_job(name: str, state: str = "active", reason: str = "", message: str = "",
            failed_at: str | None = None) -> dict[str, Any]:
    conditions = []
    if state == "succeeded":
        conditions = [{"type": "Complete", "status": "True"}]
    elif state == "failed":
        conditions = [{"type": "Failed", "status": "True", "reason": reason or "BackoffLimitExceeded",
                       "message": message} | ({"lastTransitionTime": failed_at} if failed_at else {})]
    return {"metadata": {"name": name}, "status": {"conditions": conditions}}


def k8s_pod(name: str, exit_code: int | None, reason: str = "Error", message: str = "",
            pod_reason: str = "", disrupted: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Succeeded" if exit_code == 0 else "Failed"}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "runner", "state": {"terminated": {
            "exitCode": exit_code, "reason": reason, "message": message}}}]
    if pod_reason:
        status["reason"] = pod_reason
    if disrupted:
        status["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    return {"metadata": {"name": name}, "status": status}


@pytest.fixture
def job() -> PurificationJob:
    return make_job()
