"""Our store layer against the minio SDK's own fput_object / fget_object, same file, same server.

    .venv/bin/python benchmarks/bench_store.py            # 1 GiB object (default)
    .venv/bin/python benchmarks/bench_store.py --mib 256

Starts a MinIO server (built by `make k8s`) in a separate process on loopback, writes a
file of random bytes, and prints for upload and download: seconds, MiB/s, throughput as a ratio
to the SDK's (target >= 0.9), and the peak Python heap allocated during the transfer (tracemalloc;
streaming means it stays a few part sizes, not the file size). Our download also verifies a
SHA-256 against the stage manifest's, which the plain SDK call does not: the table shows both.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from minio import Minio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disp_store.s3 import S3Store  # noqa: E402
from tests.harness.minio import S3_ACCESS as ACCESS, S3_SECRET as SECRET, MinioServer  # noqa: E402
from tests.harness.tools import build_cluster_tools  # noqa: E402

BUCKET = "bench"


def measure(fn) -> tuple[float, float]:
    """(seconds, peak MiB of Python heap allocated while fn ran)."""
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="object size in MiB (default 1024)")
    args = parser.parse_args(argv)
    server = MinioServer(build_cluster_tools() / "minio", Path(tempfile.mkdtemp(prefix="bench-store-"))).start()
    try:
        endpoint = server.endpoint
        sdk = Minio(endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)
        sdk.make_bucket(BUCKET)
        ours = S3Store(endpoint, ACCESS, SECRET, secure=False)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "object.bin"
            digest = hashlib.sha256()
            with open(src, "wb") as handle:
                for _ in range(args.mib):
                    block = os.urandom(2**20)
                    digest.update(block)
                    handle.write(block)
            sha = digest.hexdigest()
            rows = []
            # Same part size for both, so the comparison is of the layers, not of part sizes.
            from disp_store.s3 import PART_SIZE

            sdk_up = measure(lambda: sdk.fput_object(BUCKET, "sdk.bin", str(src), part_size=PART_SIZE,
                                                     num_parallel_uploads=1))
            our_up = measure(lambda: ours.upload_file(src, BUCKET, "ours.bin"))
            sdk_down = measure(lambda: sdk.fget_object(BUCKET, "sdk.bin", str(Path(tmp) / "sdk.out")))
            our_down = measure(lambda: ours.download_file(BUCKET, "ours.bin", Path(tmp) / "ours.out"))
            our_down_v = measure(lambda: ours.download_file(BUCKET, "ours.bin", Path(tmp) / "ours2.out", sha256=sha))
            rows = [("upload", sdk_up, our_up), ("download", sdk_down, our_down),
                    ("download + sha256 check", sdk_down, our_down_v)]
            print(f"object {args.mib} MiB, MinIO ({server.version()}) on loopback, part size "
                  f"{PART_SIZE // 2**20} MiB")
            print(f"{'operation':<24} {'SDK s':>7} {'ours s':>7} {'SDK MiB/s':>10} {'ours MiB/s':>10} "
                  f"{'ratio':>6} {'SDK peak MiB':>12} {'ours peak MiB':>13}")
            for name, (s_sec, s_mem), (o_sec, o_mem) in rows:
                print(f"{name:<24} {s_sec:7.2f} {o_sec:7.2f} {args.mib / s_sec:10.1f} {args.mib / o_sec:10.1f} "
                      f"{s_sec / o_sec:6.2f} {s_mem:12.1f} {o_mem:13.1f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
