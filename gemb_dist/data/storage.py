"""Where shards live: a local directory, a `file://` URL or S3-compatible storage (`s3://bucket/prefix`).

S3 endpoint and credentials come only from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or any other source boto3 reads), never from a config file.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO
from urllib.parse import unquote, urlparse

MANIFEST_NAME = "manifest.json"


class Storage:
    """Read access to one dataset root; `url(name)` names a file for messages, `open(name)` streams it."""

    def __init__(self, location: str):
        if not location:
            raise ValueError("data.shards is empty: set it to a shard directory, file:// URL or s3://bucket/prefix")
        location = location.rstrip("/")
        self.manifest_name = MANIFEST_NAME
        if location.endswith(".json"):  # a manifest given directly: its directory is the root
            location, _, self.manifest_name = location.rpartition("/")
        parsed = urlparse(location)
        self.scheme = parsed.scheme if parsed.scheme in ("s3", "file") else ""
        if self.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"{location}: an S3 location must look like s3://bucket/prefix")
            self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        elif self.scheme == "file":
            self.root = unquote(parsed.path)
        elif parsed.scheme:
            raise ValueError(f"{location}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
        else:
            self.root = location
        self.location = location
        self._client = None

    def url(self, name: str) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self._key(name)}"
        return os.path.join(self.root, name)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _s3(self):
        # One client per process: DataLoader workers are forked, and boto3 clients must not cross a fork.
        if self._client is None or self._client_pid != os.getpid():
            import boto3

            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
            self._client = boto3.client("s3", region_name=region)
            self._client_pid = os.getpid()
        return self._client

    def open(self, name: str) -> BinaryIO:
        """A readable binary stream; FileNotFoundError when the object does not exist."""
        if self.scheme != "s3":
            return open(self.url(name), "rb")
        from botocore.exceptions import ClientError

        try:
            return self._s3().get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.url(name)}: no such object") from None
            raise OSError(f"{self.url(name)}: {err}") from None

    def read_bytes(self, name: str) -> bytes:
        stream = self.open(name)
        try:
            return stream.read()
        finally:
            stream.close()

    def sha256(self, name: str) -> str:
        hasher = hashlib.sha256()
        stream = self.open(name)
        try:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                hasher.update(chunk)
        finally:
            stream.close()
        return hasher.hexdigest()

    def __getstate__(self):  # clients are per process; never pickle one into a worker
        state = dict(self.__dict__)
        state["_client"] = None
        return state
