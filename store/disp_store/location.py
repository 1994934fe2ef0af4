"""Where a manifest URI points: a local folder (plain path or file://) or an S3 prefix (s3://bucket/key)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from disp_api.contract import is_s3_uri, split_s3_uri, uri_problem
from disp_store.errors import UserInputError


class Scheme(str, Enum):
    LOCAL = "file"
    S3 = "s3"


@dataclass(frozen=True)
class Location:
    scheme: Scheme
    path: Path | None = None  # LOCAL
    bucket: str = ""  # S3
    key: str = ""  # S3 prefix, no leading or trailing "/"

    @classmethod
    def parse(cls, uri: str, field_name: str) -> "Location":
        """The location `uri` names, refused (naming `field_name`) before anything is created or
        removed when it could leave its folder: the spec's own check (uri_problem), for the URIs
        that come from elsewhere (command-line flags, attack records) too."""
        problem = uri_problem(uri)
        if problem is not None:
            raise UserInputError(f"{field_name}: {uri[:200]!r} {problem}")
        if is_s3_uri(uri):
            bucket, key = split_s3_uri(uri)
            return cls(Scheme.S3, bucket=bucket, key=key)
        if uri.startswith("file://"):
            return cls(Scheme.LOCAL, path=Path(uri[len("file://"):]))
        return cls(Scheme.LOCAL, path=Path(uri))

    def child(self, *parts: str) -> "Location":
        if self.scheme is Scheme.LOCAL:
            return Location(Scheme.LOCAL, path=self.path.joinpath(*parts))
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return Location(Scheme.S3, bucket=self.bucket, key=key)

    def __str__(self) -> str:
        return str(self.path) if self.scheme is Scheme.LOCAL else f"s3://{self.bucket}/{self.key}"
