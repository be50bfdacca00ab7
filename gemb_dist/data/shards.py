"""Reading the samples a plan asks for out of tar shards, through webdataset's tar pipeline stages.

A `ShardReader` keeps a few shards open at their current position, so a worker that walks a shard in order
reads it once; unreadable samples (missing shard, truncated or corrupt tar, invalid JSON or schema) come back
as `BadSample`s that the caller counts and replaces.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds

from gemb_dist.data.manifest import Manifest
from gemb_dist.data.plan import GroupOrder, Ranges
from gemb_dist.data.schema import validate_sample
from gemb_dist.data.storage import Storage

NO_SHUFFLE_PIECE = 1024  # positions fetched together when blocks are off (memory bound of a worker)
READ_RETRIES = 4  # reopens of a shard whose stream broke mid-read: 0.5 + 1 + 2 + 4 s of backoff
READ_RETRY_BACKOFF_S = 0.5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSample:
    """A planned sample that could not be read; `reason` names the shard."""

    reason: str


class _Cursor:
    """An open shard stream and the index of the next sample it will produce.

    A stream that breaks (a dropped connection, a read timeout) is reopened and fast-forwarded to where it
    was (S3 only), up to READ_RETRIES times per shard with exponential backoff, before the rest of the shard
    is counted bad: botocore retries a request, not a body that fails halfway.
    """

    def __init__(self, storage: Storage, path: str):
        self.storage, self.path = storage, path
        self.url = storage.url(path)
        self.next_index = 0
        self.error: str | None = None
        # A local file does not drop connections: its read errors are the data's, retrying cannot help.
        self.retries_left = READ_RETRIES if storage.scheme == "s3" else 0
        self.stream = None
        self._open()

    def _open(self) -> None:
        try:
            self.stream = self.storage.open(self.path)
        except FileNotFoundError:
            self.error, self.samples = f"{self.url}: shard missing from storage", iter(())
            return
        except OSError as err:
            self.error, self.samples = f"{self.url}: cannot open shard ({err})", iter(())
            return
        files = wds.tariterators.tar_file_expander([{"url": self.url, "stream": self.stream}])
        self.samples = wds.tariterators.group_by_keys(files)

    def _reopen(self, failure: str) -> bool:
        """After a read failure: reopen at `next_index`; False when retries are spent or reopening fails."""
        while self.retries_left > 0:
            delay_s = READ_RETRY_BACKOFF_S * 2 ** (READ_RETRIES - self.retries_left)
            self.retries_left -= 1
            log.warning("%s; reopening the shard at sample %d in %.1f s", failure, self.next_index, delay_s)
            self.close()
            time.sleep(delay_s)
            self.error = None
            self._open()
            if self.error is not None:
                failure = self.error
                continue
            try:
                for _ in range(self.next_index):
                    if next(self.samples, None) is None:
                        return False
                return True
            except Exception as err:  # noqa: BLE001 - broke again while fast-forwarding: try again
                failure = f"{self.url}: unreadable while reopening ({type(err).__name__}: {err})"
        self.error = failure
        return False

    def advance(self) -> dict[str, Any] | None:
        """The next raw tar sample, or None at the end or after an error (recorded in `error`)."""
        while self.error is None:
            try:
                sample = next(self.samples, None)
            except Exception as err:  # noqa: BLE001 - any tar/stream failure makes the rest of the shard unreadable
                failure = f"{self.url}: unreadable after sample {self.next_index} ({type(err).__name__}: {err})"
                if not self._reopen(failure):
                    self.error = self.error or failure
                continue
            if sample is None:
                self.error = f"{self.url}: ended after {self.next_index} samples (truncated shard?)"
                return None
            self.next_index += 1
            return sample
        return None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class ShardReader:
    def __init__(self, manifest: Manifest, storage: Storage, max_open: int = 4):
        self.manifest = manifest
        self.storage = storage
        self.max_open = max_open
        self._cursors: OrderedDict[int, _Cursor] = OrderedDict()

    def _cursor(self, shard: int, first_index: int) -> _Cursor:
        cursor = self._cursors.pop(shard, None)
        if cursor is None or cursor.next_index > first_index:  # streams only go forward: reopen to go back
            if cursor is not None:
                cursor.close()
            cursor = _Cursor(self.storage, self.manifest.shards[shard].path)
        self._cursors[shard] = cursor
        while len(self._cursors) > self.max_open:
            self._cursors.popitem(last=False)[1].close()
        return cursor

    def fetch(self, shard: int, indices: list[int]) -> dict[int, dict[str, Any] | BadSample]:
        """The validated samples at the sorted `indices` of one shard (BadSample where unreadable)."""
        cursor = self._cursor(shard, indices[0])
        wanted = set(indices)
        found: dict[int, dict[str, Any] | BadSample] = {}
        while cursor.next_index <= indices[-1]:
            index = cursor.next_index
            raw = cursor.advance()
            if raw is None:
                break
            if index in wanted:
                found[index] = _decode(raw, f"{cursor.url}:{raw.get('__key__')}")
        for index in indices:
            if index not in found:
                found[index] = BadSample(cursor.error or f"{cursor.url}: sample {index} not found")
        return found

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()


def _decode(raw: dict[str, Any], where: str) -> dict[str, Any] | BadSample:
    try:
        if "json" not in raw:
            raise ValueError(f"{where}: no .json member in this sample")
        return validate_sample(json.loads(raw["json"]), where)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        return BadSample(str(err) if where in str(err) else f"{where}: {err}")


def iter_positions(order: GroupOrder, ranges: Ranges, reader: ShardReader) -> Iterator[dict[str, Any] | BadSample]:
    """The samples at `ranges` of `order`, in order, fetched one block (or carry, or piece) at a time."""
    for start, stop in ranges:
        position = start
        while position < stop:
            end = min(stop, _piece_end(order, position))
            items_N2 = order.items(position, end)
            fetched: dict[tuple[int, int], Any] = {}
            for shard in np.unique(items_N2[:, 0]).tolist():
                indices = sorted(set(items_N2[items_N2[:, 0] == shard, 1].tolist()))
                for index, sample in reader.fetch(shard, indices).items():
                    fetched[shard, index] = sample
            for shard, index in items_N2.tolist():
                yield fetched[shard, index]
            position = end


def _piece_end(order: GroupOrder, position: int) -> int:
    num_carry = len(order.carry)
    if position < num_carry:
        return num_carry
    if order.block_size <= 0:
        return position + NO_SHUFFLE_PIECE
    return num_carry + (order.block_of(position) + 1) * order.block_size
