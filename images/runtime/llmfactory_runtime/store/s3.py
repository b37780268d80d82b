"""s3:// artifact store (boto3). Endpoint, region and credentials come from the standard AWS
environment variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, or a pod's IRSA role): the task document never carries them."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .base import Store


def _client():
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # S3-compatible servers (MinIO, SeaweedFS, Ceph) want path-style addressing.
    style = os.environ.get("LLMFACTORY_S3_ADDRESSING_STYLE", "path" if endpoint else "auto")
    # A new session each time: the default session caches credentials, and rotated ones must apply.
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 8, "mode": "adaptive"}),
    )


class S3Store(Store):
    def __init__(self, uri: str, client=None):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"s3:// URIs need a bucket: {uri}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client or _client()

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def child(self, rel: str) -> "S3Store":
        return S3Store(f"s3://{self.bucket}/{self._key(rel)}", self.client)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}/{rel}") from None
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def exists(self, rel: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def _keys(self, rel: str) -> list[str]:
        prefix = self._key(rel)
        prefix = f"{prefix}/" if prefix else ""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    def list(self, rel: str = "") -> list[str]:
        prefix = self._key(rel)
        cut = len(prefix) + 1 if prefix else 0
        return sorted(k[cut:] for k in self._keys(rel))

    def delete_prefix(self, rel: str = "") -> None:
        self._delete_keys(self._keys(rel))

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def delete_many(self, rels: list[str]) -> None:
        self._delete_keys([self._key(rel) for rel in rels])

    def _delete_keys(self, keys: list[str]) -> None:
        """A thousand objects a request (S3's DeleteObjects), not a request each."""
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def upload_file(self, local: Path, rel: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(rel))

    def download_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(rel), str(local))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}/{rel}") from None
            raise
