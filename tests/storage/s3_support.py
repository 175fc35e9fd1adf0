"""What the s3 tests look at: the bucket's objects, unfinished uploads, and the catalogue."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from tests.seaweed import SeaweedServer

HEADER = "X-Code-Commit"
MiB = 1024 * 1024


def digest_header(body: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode()}:"


def put(url: str, path: str, body: Any, commit: str | None, **headers: str) -> httpx.Response:
    sent = {HEADER: commit} if commit is not None else {}
    return httpx.put(f"{url}{path}", content=body, headers={**sent, **headers}, timeout=120)


def objects(server: SeaweedServer, bucket: str) -> dict[str, dict[str, Any]]:
    """key -> HEAD answer of every object in the bucket (helpers included)."""
    client = server.client()
    found: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.head_object(Bucket=bucket, Key=item["Key"])
    return found


def unfinished_uploads(server: SeaweedServer, bucket: str) -> list[str]:
    answer = server.client().list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def read_object(server: SeaweedServer, bucket: str, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def index_rows(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "index.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_nothing_left(server: SeaweedServer, bucket: str, data_dir: Path) -> None:
    """No object (helpers included), no unfinished multipart upload, no row."""
    assert objects(server, bucket) == {}
    assert unfinished_uploads(server, bucket) == []
    assert index_rows(data_dir) == []
