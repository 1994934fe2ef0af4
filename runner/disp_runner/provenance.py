"""Provenance of a purified model: what made it, and a check that nothing has changed since.

Every run whose fine-tune is complete carries, in its run folder, `provenance.json`: an in-toto
Statement (v1) with an SLSA Provenance (v1) predicate.

- subject: the purified model's files (and the projector file, when written) with their SHA-256;
- buildDefinition.externalParameters: the PurificationJob as applied (name, namespace, uid,
  generation, and its whole spec; the spec holds Secret references only, never their values);
- buildDefinition.resolvedDependencies: every input the stages read (model, projector, dataset,
  evaluation sets, attack record) with the SHA-256 of each of its files and one digest over them;
- runDetails: the run id, when its stages ran, and, as byproducts, each stage's manifest (its
  digest, and the runner version and image that built it). Each manifest lists every file of its
  stage with its digest and the manifest of the stage before it, so the chain runs from the
  inputs to the model.

With a signing key (an Ed25519 private key in PEM: `disp run --signing-key FILE`, or the
DISP_SIGNING_KEY environment variable, which the operator fills from a Secret) the Statement is
also signed: `provenance.sig.json` is a DSSE envelope whose payload is provenance.json's bytes.
`verify_run` (`disp verify RUN`) checks all of it and names every file that does not match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from disp_api import PurificationJob, StageName
from disp_api.rounds import round_folder
from disp_api.contract import PROVENANCE_FILE, PROVENANCE_SIGNATURE_FILE, RUNNER_IMAGE_ENV, SIGNING_KEY_ENV
from disp_api.version import VERSION
from disp_runner.folders import write_atomically
from disp_runner.errors import UserInputError
from disp_runner.pipeline.artifacts import (STAGE_MANIFEST, UPSTREAM_PREFIX, RunLayout, file_entries,
                                            read_stage_manifest, sha256_file, stage_file_problems)
from disp_runner.safepaths import resolve_inside
from disp_store.location import Location, Scheme

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://disp.dev/PurificationJob/v1"
BUILDER_ID = "https://disp.dev/disp-runner"
PAYLOAD_TYPE = "application/vnd.in-toto+json"  # DSSE's type for an in-toto Statement

# The files of the fine-tune's output that are the purified model.
MODEL_PREFIX, PROJECTOR_NAME = "model/", "projector.safetensors"


# -- digests of what a stage reads ------------------------------------------------------------------
class InputKind(str, Enum):
    """What an input's digest covers."""

    FILE = "file"  # one file (a projector, an attack record)
    FOLDER = "folder"  # every file of a folder (a model, a dataset)


def content_digest(path: Path) -> dict[str, Any]:
    """A file's SHA-256, or for a folder one SHA-256 over its files' paths, sizes and digests; with
    the file list, so a check can name the file that changed."""
    files = file_entries(path)
    if path.is_file():
        return {"sha256": files[0]["sha256"], "kind": InputKind.FILE.value, "files": files}
    lines = "".join(f"{f['path']}\t{f['size']}\t{f['sha256']}\n" for f in files)
    return {"sha256": hashlib.sha256(lines.encode()).hexdigest(), "kind": InputKind.FOLDER.value, "files": files}


def runner_identity() -> dict[str, Any]:
    """Which runner built a stage: this code's version and, in a pod, the image it ran from."""
    return {"version": VERSION, "image": os.environ.get(RUNNER_IMAGE_ENV) or None}


# -- the Statement ---------------------------------------------------------------------------------------
def _complete_manifests(job: PurificationJob, layout: RunLayout) -> dict[StageName, dict[str, Any]]:
    return {stage: read_stage_manifest(layout.stage_dir(stage)) for stage in job.spec.stages()
            if layout.is_complete(stage)}


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def build_statement(job: PurificationJob, layout: RunLayout, round_number: int = 1) -> dict[str, Any]:
    """The run's Statement, from its stage manifests alone (no file is hashed again here); the
    fine-tune must be complete. `round_number`: the purification round (spec.rounds) whose stages
    these are; `job` carries that round's settings."""
    manifests = _complete_manifests(job, layout)
    finetune = manifests.get(StageName.FINETUNE)
    if finetune is None:
        raise ValueError("provenance needs the fine-tune's output (the purified model)")
    subject = [{"name": f"{StageName.FINETUNE.value}/{f['path']}", "digest": {"sha256": f["sha256"]}}
               for f in finetune["files"] if f["path"].startswith(MODEL_PREFIX) or f["path"] == PROJECTOR_NAME]
    uris = job.spec.uris()
    dependencies: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, manifest in manifests.items():
        for field_name, digest in manifest.get("inputDigests", {}).items():
            entry = dependencies.setdefault((field_name, digest["sha256"]), {
                "name": field_name, "uri": uris.get(field_name), "digest": {"sha256": digest["sha256"]},
                "annotations": {"kind": digest["kind"], "files": digest["files"], "readBy": []}})
            entry["annotations"]["readBy"].append(stage.value)
    started = [_time(m["completedAt"]) - timedelta(seconds=m["seconds"]) for m in manifests.values()]
    finished = [_time(m["completedAt"]) for m in manifests.values()]
    byproducts = [{"name": f"{stage.value}/{STAGE_MANIFEST}",
                   "digest": {"sha256": sha256_file(layout.stage_dir(stage) / STAGE_MANIFEST)},
                   "annotations": {"runner": manifest.get("runner")}}
                  for stage, manifest in manifests.items()]
    meta = job.metadata
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"apiVersion": job.api_version, "kind": job.kind,
                                       "metadata": {"name": meta.name, "namespace": meta.namespace,
                                                    "uid": meta.uid, "generation": meta.generation},
                                       "spec": job.spec.to_wire()},
                # A later round's outputs lie in a folder of their own under the run's.
                "internalParameters": {"runPath": "/".join(filter(None, [job.run_path, round_folder(round_number)])),
                                       "round": round_number},
                "resolvedDependencies": list(dependencies.values()),
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"disp": VERSION}},
                "metadata": {"invocationId": job.run_id,
                             "startedOn": min(started).isoformat(timespec="seconds"),
                             "finishedOn": max(finished).isoformat(timespec="seconds")},
                "byproducts": byproducts,
            },
        },
    }


# -- signing (DSSE, Ed25519) -----------------------------------------------------------------------------
def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type cannot be swapped."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _key_id(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_signing_key(path: Path | None = None):
    """The Ed25519 private key to sign with: the file `path` (`disp run --signing-key`), else the
    PEM in $DISP_SIGNING_KEY (a stage pod's, from the Secret), else None. Raises UserInputError
    naming where it came from (never its content) when it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path is None and os.environ.get(SIGNING_KEY_ENV):
        source, pem = SIGNING_KEY_ENV, os.environ[SIGNING_KEY_ENV].encode()
    elif path is not None:
        source = f"--signing-key {path}"
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise UserInputError(f"{source}: cannot read it ({exc.strerror})") from None
    else:
        return None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserInputError(f"{source}: not an unencrypted Ed25519 private key in PEM "
                             "(make one with: openssl genpkey -algorithm ed25519 -out key.pem)")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise UserInputError(f"--key {path}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise UserInputError(f"--key {path}: not an Ed25519 public key in PEM "
                             "(from the private key: openssl pkey -in key.pem -pubout -out key.pub)")
    return key


def sign(payload: bytes, key) -> dict[str, Any]:
    """A DSSE envelope over `payload`."""
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": _key_id(key.public_key()),
                            "sig": base64.b64encode(key.sign(_pae(PAYLOAD_TYPE, payload))).decode()}]}


def write_provenance(job: PurificationJob, manifests: RunLayout, into: Path | None = None,
                     signing_key_file: Path | None = None, round_number: int = 1) -> list[Path]:
    """Write provenance.json (and, with a signing key, provenance.sig.json) into the run folder
    (`into`, by default the one `manifests` lays out: a folder holding the stage manifests), each
    atomically; returns the files written, the Statement first."""
    key = load_signing_key(signing_key_file)  # refused before anything is written
    into = into or manifests.root
    payload = (json.dumps(build_statement(job, manifests, round_number), indent=2, sort_keys=True) + "\n").encode()
    written = [write_atomically(into / PROVENANCE_FILE, payload)]
    signature = into / PROVENANCE_SIGNATURE_FILE
    if key is not None:
        written.append(write_atomically(signature, (json.dumps(sign(payload, key), indent=2) + "\n").encode()))
    elif signature.exists():
        signature.unlink()  # a signature over an earlier Statement would not match this one
    return written


def publish_remote_provenance(job: PurificationJob, store: Any, bucket: str, prefix: str, into: Path,
                              signing_key_file: Path | None = None, round_number: int = 1) -> None:
    """The same for a run whose stage outputs live in S3 at `prefix` (`store`: an S3Store): the
    Statement is built from the stage manifests published there, written into the local folder
    `into` and uploaded to the prefix, the Statement first, then the signature; a signature left
    from an earlier signed Statement is removed when this one is unsigned."""
    with tempfile.TemporaryDirectory(prefix="disp-manifests-") as folder:
        manifests = RunLayout(Path(folder))
        for stage in job.spec.stages():
            data = store.get_bytes_or_none(bucket, f"{prefix}/{stage.value}/{STAGE_MANIFEST}")
            if data is not None:
                manifests.stage_dir(stage).mkdir()
                (manifests.stage_dir(stage) / STAGE_MANIFEST).write_bytes(data)
        into.mkdir(parents=True, exist_ok=True)
        written = write_provenance(job, manifests, into=into, signing_key_file=signing_key_file,
                                   round_number=round_number)
    for path in written:
        store.put_bytes(bucket, f"{prefix}/{path.name}", path.read_bytes())
    if len(written) == 1:
        store.remove(bucket, [f"{prefix}/{PROVENANCE_SIGNATURE_FILE}"])




# -- verification ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One thing that does not match: the file (or record) and what is wrong with it."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Verification:
    checked: list[str]  # what was checked, a line each
    findings: list[Finding]
    stage_files: int = 0  # files of the stage outputs compared with their manifests

    @property
    def ok(self) -> bool:
        return not self.findings


def verify_run(run: Path, public_key_path: Path | None = None, check_inputs: bool = True,
               store: Any = None) -> Verification:
    """Check a run folder against its provenance: the signature (when the run is signed, with the
    public key given), every stage manifest against the Statement, every file against its stage
    manifest, the chain of manifests, the purified model against the subject and, with
    `check_inputs`, every input against the digests the stages recorded (local ones, and those in
    S3 when `store`, an S3Store, is given)."""
    checked: list[str] = []
    findings: list[Finding] = []
    statement_path = run / PROVENANCE_FILE
    if not statement_path.is_file():
        raise UserInputError(f"{statement_path}: no provenance in this folder (is it a run folder whose "
                             "fine-tune is complete?)")
    payload = statement_path.read_bytes()
    findings += _check_signature(run, payload, public_key_path, checked)
    try:
        statement = json.loads(payload)
        predicate = statement["predicate"]
        byproducts = predicate["runDetails"]["byproducts"]
        dependencies = predicate["buildDefinition"]["resolvedDependencies"]
        subject = statement["subject"]
        if statement["_type"] != STATEMENT_TYPE or statement["predicateType"] != PREDICATE_TYPE:
            raise ValueError("not an in-toto Statement with an SLSA provenance predicate")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{statement_path}: unreadable provenance ({exc})") from None
    try:
        return _verify_statement(run, byproducts, subject, dependencies, check_inputs, checked, findings, store)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an edited record of the wrong shape
        raise UserInputError(f"{statement_path}: malformed provenance ({type(exc).__name__}: {exc})") from None


def _verify_statement(run: Path, byproducts: list, subject: list, dependencies: list, check_inputs: bool,
                      checked: list[str], findings: list[Finding], store: Any) -> Verification:
    manifests: dict[str, dict[str, Any]] = {}
    for index, product in enumerate(byproducts):
        path = resolve_inside(run, product["name"], f"{PROVENANCE_FILE} byproducts[{index}].name", "the run folder")
        stage = StageName(product["name"].split("/", 1)[0]).value
        if not path.is_file():
            findings.append(Finding(str(path), "listed in provenance.json but missing"))
            continue
        if sha256_file(path) != product["digest"]["sha256"]:
            findings.append(Finding(str(path), "differs from the digest provenance.json records"))
        try:
            manifests[stage] = read_stage_manifest(path.parent)
        except UserInputError as exc:
            findings.append(Finding(str(path), str(exc)))
            continue
        findings += [Finding(str(file), problem) for file, problem in stage_file_problems(path.parent, manifests[stage])]
        checked.append(f"{stage}: {_files(len(manifests[stage]['files']))}")
    findings += _check_chain(run, manifests)
    for index, item in enumerate(subject):
        path = resolve_inside(run, item["name"], f"{PROVENANCE_FILE} subject[{index}].name", "the run folder")
        if not path.is_file():
            findings.append(Finding(str(path), "the purified model's file is missing"))
        elif sha256_file(path) != item["digest"]["sha256"]:
            findings.append(Finding(str(path), "the purified model's file differs from provenance.json's subject"))
    checked.append(f"subject: {_files(len(subject))} of the purified model")
    findings += _check_dependencies(dependencies, check_inputs, checked, store)
    return Verification(checked, findings, sum(len(m["files"]) for m in manifests.values()))


def _files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def _check_signature(run: Path, payload: bytes, public_key_path: Path | None, checked: list[str]) -> list[Finding]:
    from cryptography.exceptions import InvalidSignature

    envelope_path = run / PROVENANCE_SIGNATURE_FILE
    if not envelope_path.is_file():
        if public_key_path is not None:
            return [Finding(str(run / PROVENANCE_FILE), "not signed (no provenance.sig.json), but --key was given")]
        checked.append("signature: none (the run is not signed)")
        return []
    if public_key_path is None:
        return [Finding(str(envelope_path), "the run is signed; pass --key PUBLIC.pem to check the signature")]
    key = load_public_key(public_key_path)
    try:
        envelope = json.loads(envelope_path.read_bytes())
        signed = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope["signatures"]
        payload_type = envelope["payloadType"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        return [Finding(str(envelope_path), f"unreadable DSSE envelope ({exc})")]
    if signed != payload:
        return [Finding(str(run / PROVENANCE_FILE), "differs from the payload provenance.sig.json signs")]
    for signature in signatures if isinstance(signatures, list) else []:
        try:
            key.verify(base64.b64decode(signature["sig"], validate=True), _pae(payload_type, signed))
        except (InvalidSignature, KeyError, TypeError, ValueError):
            continue
        checked.append(f"signature: valid, key {_key_id(key)[:16]}")
        return []
    return [Finding(str(envelope_path), f"no signature made with the key {public_key_path}")]


def _check_chain(run: Path, manifests: dict[str, dict[str, Any]]) -> list[Finding]:
    """Each stage's record of the manifest of every earlier stage it read equals that manifest."""
    findings = []
    for stage, manifest in manifests.items():
        for name, fingerprint in manifest.get("inputs", {}).items():
            if not name.startswith(UPSTREAM_PREFIX):
                continue
            upstream = run / StageName(name.removeprefix(UPSTREAM_PREFIX)).value / STAGE_MANIFEST
            if not upstream.is_file() or f"sha256:{sha256_file(upstream)}" != fingerprint:
                findings.append(Finding(str(upstream), f"is not the output the {stage} stage was built from"))
    return findings


def _check_dependencies(dependencies: Iterable[dict[str, Any]], check_inputs: bool,
                        checked: list[str], store: Any = None) -> list[Finding]:
    findings = []
    by_field: dict[str, set[str]] = {}
    for dependency in dependencies:
        by_field.setdefault(dependency["name"], set()).add(dependency["digest"]["sha256"])
    for field_name, digests in by_field.items():
        if len(digests) > 1:
            findings.append(Finding(field_name, "the stages of this run read different contents "
                                                f"({len(digests)} digests)"))
    if not check_inputs:
        checked.append("inputs: not checked (--skip-inputs)")
        return findings
    for dependency in dependencies:
        uri = dependency.get("uri") or ""
        if not uri or (uri.startswith("s3://") and store is None):
            why = f"{uri}; give --endpoint to read it" if uri else "no uri"
            checked.append(f"inputs: {dependency['name']} not checked here ({why})")
            continue
        location = Location.parse(uri, dependency["name"])
        if location.scheme is Scheme.S3:
            findings += _check_s3_input(store, location, dependency)
        else:
            findings += _check_local_input(location.path, dependency)
        checked.append(f"inputs: {dependency['name']} ({_files(len(dependency['annotations']['files']))})")
    return findings


def _relative(text: str, field_name: str) -> PurePosixPath:
    """A recorded file path inside its input, by its shape (an input may hold links that lead
    elsewhere, as a model folder of symlinked blobs does, so it is not resolved)."""
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{field_name}: a recorded file path must lie inside the input, got {text!r}")
    return path


def _check_s3_input(store: Any, location: Location, dependency: dict[str, Any]) -> list[Finding]:
    """_check_local_input for an input in S3: each recorded object's size and streamed SHA-256, and
    for a folder no object added since."""
    recorded = dependency["annotations"]["files"]
    whole_folder = InputKind(dependency["annotations"]["kind"]) is InputKind.FOLDER
    prefix = location.key
    if not whole_folder and store.exists(location.bucket, location.key):  # the URI names the one file read
        prefix = location.key.rpartition("/")[0]
    base = f"{prefix}/" if prefix else ""
    present = {name[len(base):]: size for name, size, _ in store.list(location.bucket, base)}
    findings = []
    for entry in recorded:
        name = _relative(entry["path"], dependency["name"]).as_posix()
        where = f"s3://{location.bucket}/{base}{name}"
        if name not in present:
            findings.append(Finding(where, f"an input file ({dependency['name']}) is missing"))
        elif present[name] != entry["size"] or store.sha256(location.bucket, base + name) != entry["sha256"]:
            findings.append(Finding(where, f"an input file ({dependency['name']}) changed since the run read it"))
    if whole_folder:
        known = {entry["path"] for entry in recorded}
        findings += [Finding(f"s3://{location.bucket}/{base}{name}", f"a file added to the input "
                             f"({dependency['name']}) since the run read it") for name in sorted(set(present) - known)]
    return findings


def verify_remote_run(store: Any, run: Location, into: Path, public_key_path: Path | None = None,
                      check_inputs: bool = True) -> Verification:
    """verify_run for a run in S3: its objects are copied into the empty folder `into` (each key kept
    inside it), checked there, and every finding names the object (s3://…), not the copy."""
    if not store.exists(run.bucket, f"{run.key}/{PROVENANCE_FILE}"):
        raise UserInputError(f"{run}/{PROVENANCE_FILE}: no provenance there (is it a run whose fine-tune is "
                             "complete? a run is <output>/runs/<namespace>/<name>/<run id>)")
    for key, _, _ in store.list(run.bucket, f"{run.key}/"):
        relative = key[len(run.key) + 1:]
        store.download_file(run.bucket, key, resolve_inside(into, relative, f"{run} object", "the run's copy"))
    result = verify_run(into, public_key_path, check_inputs, store=store)
    local = str(into)

    def remote(text: str) -> str:
        return str(run) + text[len(local):] if text.startswith(local) else text

    return Verification([remote(line) for line in result.checked],
                        [Finding(remote(f.where), f.problem.replace(local, str(run))) for f in result.findings],
                        result.stage_files)


def _check_local_input(root: Path, dependency: dict[str, Any]) -> list[Finding]:
    """The input's files as recorded: a folder's every file (and no other), or the one file read,
    which the URI names or which lies in the folder it names (an attack folder's attack.json)."""
    recorded = dependency["annotations"]["files"]
    whole_folder = InputKind(dependency["annotations"]["kind"]) is InputKind.FOLDER
    base = root if whole_folder or root.is_dir() else root.parent
    findings = []
    for entry in recorded:
        path = base / _relative(entry["path"], dependency["name"])
        if not path.is_file():
            findings.append(Finding(str(path), f"an input file ({dependency['name']}) is missing"))
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            findings.append(Finding(str(path), f"an input file ({dependency['name']}) changed since the run read it"))
    if whole_folder and root.is_dir():
        known = {entry["path"] for entry in recorded}
        extra = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        findings += [Finding(str(root / name), f"a file added to the input ({dependency['name']}) since the run "
                                                "read it") for name in sorted(set(extra) - known)]
    return findings
