"""S3 credentials come from the environment, never from the manifest: the operator maps the spec's
Secret reference to DISP_S3_ACCESS_KEY / DISP_S3_SECRET_KEY (env) or mounts it and sets the
*_FILE variants; the AWS_* names are read last, for local use."""

from __future__ import annotations

import os
from pathlib import Path

from disp_api import StorageSpec
from disp_store.errors import UserInputError
from disp_store.s3 import S3Store


def _secret(name: str, aws_name: str) -> str | None:
    file_var = os.environ.get(f"{name}_FILE")
    if file_var:
        path = Path(file_var)
        if not path.is_file():
            raise UserInputError(f"{name}_FILE: {path} does not exist")
        return path.read_text().strip()
    return os.environ.get(name) or os.environ.get(aws_name)


def open_s3_store(storage: StorageSpec | None) -> S3Store:
    if storage is None or not storage.endpoint:
        raise UserInputError("spec.storage.endpoint: required when a URI is s3://")
    access = _secret("DISP_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    secret = _secret("DISP_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise UserInputError("S3 credentials missing: set DISP_S3_ACCESS_KEY and DISP_S3_SECRET_KEY "
                             "(or their *_FILE variants)")
    return S3Store(storage.endpoint, access, secret, secure=storage.secure, region=storage.region)
