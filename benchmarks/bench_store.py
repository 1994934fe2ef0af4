"""Our store layer against the minio SDK's own fput_object / fget_object, same file, same server.

    .venv/bin/python benchmarks/bench_store.py            # 1 GiB object (default)
    .venv/bin/python benchmarks/bench_store.py --mib 256

Starts moto's S3 server in a separate process on loopback (so its memory is not ours), writes a
file of random bytes, and prints for upload and download: seconds, MiB/s, throughput as a ratio
to the SDK's (target >= 0.9), and the peak Python heap allocated during the transfer (tracemalloc;
streaming means it stays a few part sizes, not the file size). Our download also verifies a
SHA-256 against the stage manifest's, which the plain SDK call does not: the table shows both.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from minio import Minio

from disp_runner.store.s3 import S3Store

ACCESS, SECRET, BUCKET = "bench-access", "bench-secret", "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    server_bin = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


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
    port = free_port()
    server = start_server(port)
    try:
        endpoint = f"127.0.0.1:{port}"
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
            from disp_runner.store.s3 import PART_SIZE

            sdk_up = measure(lambda: sdk.fput_object(BUCKET, "sdk.bin", str(src), part_size=PART_SIZE,
                                                     num_parallel_uploads=1))
            our_up = measure(lambda: ours.upload_file(src, BUCKET, "ours.bin"))
            sdk_down = measure(lambda: sdk.fget_object(BUCKET, "sdk.bin", str(Path(tmp) / "sdk.out")))
            our_down = measure(lambda: ours.download_file(BUCKET, "ours.bin", Path(tmp) / "ours.out"))
            our_down_v = measure(lambda: ours.download_file(BUCKET, "ours.bin", Path(tmp) / "ours2.out", sha256=sha))
            rows = [("upload", sdk_up, our_up), ("download", sdk_down, our_down),
                    ("download + sha256 check", sdk_down, our_down_v)]
            print(f"object {args.mib} MiB, moto S3 server on loopback (separate process), part size "
                  f"{PART_SIZE // 2**20} MiB")
            print(f"{'operation':<24} {'SDK s':>7} {'ours s':>7} {'SDK MiB/s':>10} {'ours MiB/s':>10} "
                  f"{'ratio':>6} {'SDK peak MiB':>12} {'ours peak MiB':>13}")
            for name, (s_sec, s_mem), (o_sec, o_mem) in rows:
                print(f"{name:<24} {s_sec:7.2f} {o_sec:7.2f} {args.mib / s_sec:10.1f} {args.mib / o_sec:10.1f} "
                      f"{s_sec / o_sec:6.2f} {s_mem:12.1f} {o_mem:13.1f}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
