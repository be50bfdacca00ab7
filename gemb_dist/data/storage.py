"""Where shards live: a local directory, a `file://` URL or S3-compatible storage (`s3://bucket/prefix`).

S3 endpoint and credentials come only from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or any other source boto3 reads), never from a config file.
Throttling (503 SlowDown), 5xx answers and dropped connections are retried by botocore's own retry modes
(`adaptive` by default, `$AWS_RETRY_MODE` / `$AWS_MAX_ATTEMPTS` to change); a stream that breaks mid-object
is reopened by the shard reader (`shards.py`).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import BinaryIO
from urllib.parse import unquote, urlparse

MANIFEST_NAME = "manifest.json"
S3_RETRY_MODE = "adaptive"  # botocore's standard retries plus client-side rate limiting when throttled
S3_MAX_ATTEMPTS = 10  # about 20 s of exponential backoff (botocore caps one wait at 20 s)
BODY_RETRIES = 4  # re-reads of an object whose body broke mid-transfer: 0.5 + 1 + 2 + 4 s of backoff
BODY_RETRY_BACKOFF_S = 0.5


def s3_client_config():
    """The botocore Config of every S3 client here: retries with backoff, bounded connect/read timeouts."""
    from botocore.config import Config

    mode = os.environ.get("AWS_RETRY_MODE", S3_RETRY_MODE)
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
    return Config(retries={"mode": mode, "total_max_attempts": attempts}, connect_timeout=10, read_timeout=60)


def s3_client():
    import boto3

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    # A session of its own: boto3's default session caches the credentials it found first, for the process.
    return boto3.session.Session().client("s3", region_name=region, config=s3_client_config())


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, file:// or s3:// URI. S3 gets the same endpoint,
    region and retry budget as the boto3 clients (AWS SDK standard retries: throttling, 5xx, dropped connections),
    so what Ray Train writes (checkpoints) is retried like what we read."""
    import pyarrow.fs

    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return pyarrow.fs.FileSystem.from_uri(uri if parsed.scheme else f"file://{os.path.abspath(uri)}")
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        connect_timeout=10,
        request_timeout=60,
    )
    return filesystem, f"{parsed.netloc}{parsed.path}".rstrip("/")


def check_s3_location(url: str, field: str) -> None:
    """Fail naming `field` and `url` when its bucket cannot be used: no credentials, no such bucket, denied.

    Jobs call this on the driver, so a wrong S3 location fails before any worker starts.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parsed = urlparse(url)
    if parsed.scheme != "s3":
        return
    if not parsed.netloc:
        raise ValueError(f"{field}={url}: an S3 location must look like s3://bucket/prefix")
    try:
        s3_client().head_bucket(Bucket=parsed.netloc)
    except NoCredentialsError:
        raise ValueError(
            f"{field}={url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or another "
            "source boto3 reads) in the job's environment"
        ) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ValueError(f"{field}={url}: bucket {parsed.netloc!r} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ValueError(f"{field}={url}: access to bucket {parsed.netloc!r} denied ({code})") from None
        raise ValueError(f"{field}={url}: bucket {parsed.netloc!r} cannot be used ({err})") from None
    except BotoCoreError as err:
        raise ValueError(f"{field}={url}: S3 endpoint unusable ({err})") from None


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
            self._client = s3_client()
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
        return self._read_whole(name, lambda stream: stream.read())

    def sha256(self, name: str) -> str:
        def digest(stream) -> str:
            hasher = hashlib.sha256()
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                hasher.update(chunk)
            return hasher.hexdigest()

        return self._read_whole(name, digest)

    def _read_whole(self, name: str, consume):
        """`consume(stream)` over the whole object; an S3 body that breaks halfway is read again from the start
        (botocore retries requests, not a body that fails after the headers), BODY_RETRIES times."""
        from botocore.exceptions import BotoCoreError

        for attempt in range(BODY_RETRIES + 1):
            stream = self.open(name)
            try:
                return consume(stream)
            except (OSError, BotoCoreError) as err:
                if self.scheme != "s3" or attempt == BODY_RETRIES:
                    raise OSError(f"{self.url(name)}: read failed ({type(err).__name__}: {err})") from err
                time.sleep(BODY_RETRY_BACKOFF_S * 2**attempt)
            finally:
                stream.close()
        raise AssertionError("unreachable")

    def __getstate__(self):  # clients are per process; never pickle one into a worker
        state = dict(self.__dict__)
        state["_client"] = None
        return state
