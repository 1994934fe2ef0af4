"""`disp run --log-format json`: every line a real run writes to stdout and stderr is one JSON
object, carrying the job, namespace and stage it concerns; errors too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disp_api import StageName
from tests.tiny import job_document

DISP = str(Path(sys.executable).parent / "disp")


def _lines(out: subprocess.CompletedProcess) -> list[dict]:
    records = []
    for stream in (out.stdout, out.stderr):
        for line in stream.splitlines():
            records.append(json.loads(line))  # fails the test on the first line that is not JSON
    return records


@pytest.mark.slow
def test_every_line_of_a_whole_run_and_of_a_stage_pod_is_a_json_record(workspace):
    doc = job_document(workspace)
    doc["metadata"]["namespace"] = "ml-team"
    path = workspace / "job.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([DISP, "run", str(path), "--log-format", "json"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _lines(out)
    assert all({"time", "level", "message"} <= set(r) for r in records)
    about_the_job = [r for r in records if "job" in r]
    assert about_the_job and all(r["job"] == "tiny" and r["namespace"] == "ml-team" for r in about_the_job)
    outcomes = {r["stage"]: r for r in records if "metrics" in r}
    assert set(outcomes) == {s.value for s in StageName}
    assert outcomes["finetune"]["metrics"]["steps"] > 0 and "cleanPerformanceAfter" in outcomes["evaluate"]["metrics"]
    assert any(r.get("runFolder") for r in records)

    # A stage pod: every record after the manifest is read names the stage; progress lines carry counts.
    doc["spec"]["output"] = {"uri": str(workspace / "pod")}
    path.write_text(json.dumps(doc))
    out = subprocess.run([DISP, "--no-progress", "run", str(path), "--stage", "saliency", "--log-format", "json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [r for r in _lines(out) if "job" in r]
    assert records and all(r["stage"] == "saliency" for r in records)
    assert any(r.get("itemsTotal") == 24 and r.get("itemsDone") == 24 for r in records)


@pytest.mark.slow
def test_a_bad_manifest_is_one_json_error_line(workspace):
    doc = job_document(workspace)
    doc["spec"]["saliency"]["probes"] = 0
    path = workspace / "bad.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([DISP, "run", str(path), "--log-format", "json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    (error,) = [r for r in _lines(out) if r["level"] == "error"]
    assert error["errorKind"] == "user" and error["exitCode"] == 2 and "probes" in error["message"]
    assert out.stderr.count("\n") == 1


def test_every_package_of_the_project_is_heard_and_a_library_is_not(capsys):
    """The project's own warnings are printed, a library's are not (unless --debug): the shared
    store is one of the project's packages (its lease says when it waits for a killed pod's lease)."""
    import logging

    from disp_runner import logs
    from tests.test_import_graph import PACKAGES

    assert set(logs.OWN_LOGGERS) == set(PACKAGES)
    try:
        logs.configure()
        logging.getLogger("disp_store.lease").warning("s3://runs/x: took over the lapsed lease of pod-1")
        logging.getLogger("urllib3.connectionpool").warning("a library's retry")
        err = capsys.readouterr().err
    finally:
        logs.configure(debug=False)
    assert "disp: warning: s3://runs/x: took over the lapsed lease of pod-1" in err
    assert "a library's retry" not in err
