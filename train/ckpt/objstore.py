"""Checkpoints in object storage: any fsspec URL (s3fs for ``s3://``), behind the Storage interface.

An object store has no rename (``fs.mv`` is copy + delete, both visible for a moment), so a
checkpoint's commit point is its manifest: every data object is written first, the manifest last,
in one PUT (atomic: readers see all of it or nothing). ``names()`` lists only checkpoints whose
manifest exists, and the manager above still verifies every file against it, so a crash at any
moment of an upload leaves debris, never a checkpoint that counts. Debris - data objects of a
write that never reached its manifest, a delete cut short, abandoned multipart uploads - is removed
by ``clean_temporaries()`` (at every start, and before each write) once it is ``stale_s`` old: one
job writes each checkpoint directory (global rank 0), so only a stale process could still own it.

Deleting removes the manifest first: the checkpoint vanishes at once, the rest is debris.

Memory stays bounded: uploads go in parts of PART bytes (IN_FLIGHT in parallel where the store has
multipart uploads), downloads in ranged reads of PART bytes into the one buffer that holds the file;
on S3 neither side copies a file's bytes (train/ckpt/s3_transfer.py).

Credentials and endpoint come from where users already set them (AWS_* variables, profiles,
AWS_ENDPOINT_URL for S3-compatible stores), never from the URL or the job's config, so nothing
secret reaches logs, config.json or manifests. Every call is bounded (connect and read timeouts, a
few retries): an unreachable store fails a save in seconds, and the save policy above decides.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import xxhash

from train.ckpt import hooks, s3_transfer, storage
from train.ckpt.fs import plain as _plain
from train.ckpt.storage import INVALID_TAG, TMP_PREFIX, LocalStorage, RangedReads, Unreadable, check_size

MANIFEST = "manifest.json"  # the commit point (train.ckpt.manifest.MANIFEST)
MANIFEST_LIMIT = 16 << 20  # train.ckpt.manifest.MANIFEST_LIMIT
PART = 16 << 20  # bytes per upload part and per ranged read
IN_FLIGHT = 4  # parts (up or down) at once per file: memory <= IN_FLIGHT x PART beyond the file
STALE_S = 300.0
# Bounded calls: seconds, not minutes of silent retries.
S3_OPTIONS = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
    },
    "use_listings_cache": False,
    "skip_instance_cache": True,
}


class StoreError(OSError):
    """A call to the object store failed (unreachable, timed out, refused): an OSError, as a
    failing disk's would be, with the store's own words."""


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def check_url(url: str) -> str:
    """'' if ``url`` is usable as a checkpoint location, else why not (one line)."""
    parts = urlsplit(url)
    if parts.username or parts.password or "@" in parts.netloc:
        return (
            f"--ckpt.dir {parts.scheme}://...: credentials do not belong in the URL (it is logged and "
            "saved in config.json); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead"
        )
    if not parts.netloc:
        return f"--ckpt.dir {url!r} names no bucket; use {parts.scheme}://BUCKET/PREFIX"
    if parts.query or parts.fragment:
        return f"--ckpt.dir {url!r}: no ?query or #fragment; use {parts.scheme}://BUCKET/PREFIX"
    return ""


def first_line(e: BaseException) -> str:
    return (next(iter(str(e).strip().splitlines()), "") or type(e).__name__)[:300]


def _wrap(what: str, e: BaseException) -> OSError:
    if isinstance(e, OSError):
        return e
    return StoreError(f"{what}: {type(e).__name__}: {first_line(e)}")


@contextlib.contextmanager
def _calls(what: str) -> Iterator[None]:
    """botocore's own errors (EndpointConnectionError, ReadTimeoutError...) are not OSErrors."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        raise _wrap(what, e) from e


class _PendingWrite:
    def __init__(self, store: FsspecStorage, name: str):
        self.store, self.name = store, name
        self.written: list[str] = []
        self.manifest: bytes | None = None

    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None:
        pieces = data if isinstance(data, list) else [data]
        if _plain(file) == MANIFEST:
            self.manifest = b"".join(bytes(p) for p in pieces)  # the commit point: written by commit()
            return
        path = self.store._path(self.name, file)
        self.written.append(path)
        self.store._upload(path, pieces)
        hooks.point("ckpt.file_written")

    def commit(self) -> None:
        if self.manifest is None:
            raise ValueError("commit() before the manifest was written")
        hooks.point("ckpt.before_rename")
        self.store._upload(self.store._path(self.name, MANIFEST), [self.manifest])
        hooks.point("ckpt.after_rename")

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # what stays is debris, cleaned later
            self.store.fs.rm(self.written)


class FsspecStorage(RangedReads):
    def __init__(self, url: str, stale_s: float = STALE_S, fs=None):
        import fsspec  # an optional dependency: only for a --ckpt.dir that is a URL

        self.url = url.rstrip("/")
        self.stale_s = stale_s
        protocol = urlsplit(self.url).scheme
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(self.url, **(S3_OPTIONS if protocol in ("s3", "s3a") else {}))
        self.fs = fs
        self.root = fs._strip_protocol(self.url).rstrip("/")
        self.s3 = protocol in ("s3", "s3a")
        self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="ckpt-objstore")

    # -- paths and listing ---------------------------------------------------------------------
    def _path(self, name: str, file: str | None = None) -> str:
        return f"{self.root}/{_plain(name)}" + (f"/{_plain(file)}" if file is not None else "")

    def _objects(self) -> dict[str, dict[str, dict]]:
        """{checkpoint dir: {file: info}}: one recursive listing."""
        with _calls(f"listing {self.url}"):
            try:
                found = self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}
        out: dict[str, dict[str, dict]] = {}
        for path, info in found.items():
            rel = path[len(self.root) + 1 :].split("/") if path.startswith(self.root + "/") else []
            if len(rel) == 2:
                out.setdefault(rel[0], {})[rel[1]] = info
        return out

    def names(self) -> list[str]:
        hooks.point("ckpt.list")
        return sorted(n for n, files in self._objects().items() if MANIFEST in files and INVALID_TAG not in n)

    def set_aside_names(self) -> list[str]:
        return sorted(n for n, files in self._objects().items() if MANIFEST in files and INVALID_TAG in n)

    def location(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    # -- writing -------------------------------------------------------------------------------
    def begin(self, name: str) -> _PendingWrite:
        self.clean_temporaries(also=_plain(name))  # a crashed write of the same step: overwritten anyway
        return _PendingWrite(self, name)

    def _upload(self, path: str, pieces: list[bytes | memoryview]) -> None:
        total = sum(len(p) for p in pieces)
        with _calls(f"writing {self.fs.unstrip_protocol(path)}"):
            if self.s3 and total > PART:
                s3_transfer.multipart(self.fs, path, pieces, PART, IN_FLIGHT)
            elif self.s3:
                s3_transfer.put(self.fs, path, pieces)
            elif total <= PART:
                self.fs.pipe_file(path, b"".join(bytes(p) for p in pieces))
            else:
                self._stream_open(path, pieces)

    def _stream_open(self, path: str, pieces: list[bytes | memoryview]) -> None:
        # Not `with fs.open(...)`: leaving that block by an exception still commits a truncated object.
        f = self.fs.open(path, "wb", block_size=PART)
        try:
            for piece in pieces:
                f.write(piece)
        except BaseException:
            with contextlib.suppress(Exception):
                (f.discard if hasattr(f, "discard") else f.close)()
                self.fs.rm(path)
            raise
        f.close()

    # -- reading -------------------------------------------------------------------------------
    def _info(self, name: str, file: str) -> dict:
        with _calls(f"reading {self.location(name)}/{file}"):
            return self.fs.info(self._path(name, file))

    def _chunks(self, path: str, size: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) in order, IN_FLIGHT ranged reads ahead (any fsspec store; S3 has its own)."""
        starts = iter(range(0, size, PART))
        ahead: list[tuple[int, Future]] = []
        with _calls(f"reading {self.fs.unstrip_protocol(path)}"):
            if size <= PART:  # one plain GET
                yield 0, self.fs.cat_file(path)
                return
            for start in starts:
                ahead.append(
                    (
                        start,
                        self._pool.submit(self.fs.cat_file, path, start=start, end=min(start + PART, size)),
                    )
                )
                if len(ahead) >= IN_FLIGHT:
                    yield ahead[0][0], ahead.pop(0)[1].result()
            for start, fut in ahead:
                yield start, fut.result()

    def size(self, name: str, file: str) -> int | None:
        try:
            return int(self._info(name, file)["size"])
        except FileNotFoundError:
            return None

    def read(self, name: str, file: str, on_chunk=None, size=None, limit=None) -> memoryview:
        """As LocalStorage.read: the whole object, refused (Unreadable) before any allocation if its
        size is not ``size`` or above ``limit``; FileNotFoundError if absent."""
        actual = int(self._info(name, file)["size"])
        check_size(actual, size, limit)
        view = memoryview(np.empty(actual, dtype=np.uint8))
        if self.s3:
            with _calls(f"reading {self.location(name)}/{file}"):
                got = s3_transfer.read_into(self.fs, self._path(name, file), view, PART, IN_FLIGHT, on_chunk)
            return view[:got]
        got = 0
        for start, data in self._chunks(self._path(name, file), actual):
            if len(data) != min(PART, actual - start):
                raise Unreadable(f"changed while read ({len(data)} bytes at offset {start})")
            view[start : start + len(data)] = data
            got += len(data)
            if on_chunk is not None:
                on_chunk(view[start : start + len(data)])
        return view[:got]

    def stream(
        self, name: str, file: str, size: int, on_chunk: storage.OnChunk, into: storage.Into = None
    ) -> None:
        """As LocalStorage.stream, never the whole object in memory: IN_FLIGHT ranged reads run
        ahead into buffers of this method's (so ``into`` is not used)."""
        hooks.point("ckpt.file_read")
        self._through(name, file, size, on_chunk)

    def digest(self, name: str, file: str, size: int) -> str:
        """xxh3_64 of the object, streamed (verifying an upload holds no copy of it)."""
        hasher = xxhash.xxh3_64()
        self._through(name, file, size, hasher.update)
        return hasher.hexdigest()

    def _through(self, name: str, file: str, size: int, on_chunk: storage.OnChunk) -> None:
        check_size(int(self._info(name, file)["size"]), size, None)
        path = self._path(name, file)
        if self.s3:
            with _calls(f"reading {self.location(name)}/{file}"):
                s3_transfer.read_through(self.fs, path, size, PART, IN_FLIGHT, on_chunk)
            return
        for start, data in self._chunks(path, size):
            if len(data) != min(PART, size - start):
                raise Unreadable(f"changed while read ({len(data)} bytes at offset {start})")
            on_chunk(memoryview(bytearray(data)))  # writable, as LocalStorage's pieces are

    # -- removing ------------------------------------------------------------------------------
    def _remove(self, name: str, files: list[str]) -> None:
        """The manifest first: from then on it is debris, never a torn checkpoint."""
        with _calls(f"deleting {self.location(name)}"):
            if MANIFEST in files:
                self.fs.rm(self._path(name, MANIFEST))
            rest = [self._path(name, f) for f in files if f != MANIFEST]
            if rest:
                self.fs.rm(rest)

    def delete(self, name: str) -> None:
        self._remove(name, list(self._objects().get(_plain(name), {})))

    def set_aside(self, name: str) -> str:
        """Kept for inspection under another name: server-side copies (manifest last), then delete."""
        target = f"{name}{INVALID_TAG}{int(time.time())}-{uuid.uuid4().hex[:6]}"
        files = sorted(self._objects().get(_plain(name), {}), key=lambda f: f == MANIFEST)
        for file in files:
            self.copy(name, file, target)
        self._remove(name, files)
        return target

    def copy(self, name: str, file: str, target: str) -> None:
        """A server-side copy of one object to checkpoint directory ``target``."""
        with _calls(f"copying {self.location(name)}/{file}"):
            self.fs.copy(self._path(name, file), self._path(target, file))

    def read_into(self, name: str, file: str, offset: int, views: list[memoryview]) -> None:
        """As LocalStorage.read_into: one ranged GET (read_range's too: a sharded checkpoint's
        reader takes only the rows it needs, in windows of a few blocks), its body copied out."""
        length = sum(len(v) for v in views)
        with _calls(f"reading {self.location(name)}/{file}"):
            data = memoryview(self.fs.cat_file(self._path(name, file), start=offset, end=offset + length))
        if len(data) != length:
            raise Unreadable(f"{len(data)} of {length} bytes at offset {offset}", actual=offset + len(data))
        at = 0
        for view in views:
            view[:] = data[at : at + len(view)]
            at += len(view)

    def clean_temporaries(self, also: str | None = None) -> list[str]:
        """Remove debris at least ``stale_s`` old (``also``: that directory's, whatever its age):
        checkpoint directories without a manifest, and abandoned multipart uploads. Returns what
        was removed."""
        now, removed = time.time(), []
        for name, files in sorted(self._objects().items()):
            newest = max((_mtime(i) for i in files.values()), default=0.0)
            if MANIFEST not in files and (name == also or now - newest >= self.stale_s):
                self._remove(name, list(files))
                removed.append(name)
            elif MANIFEST in files and len(files) > 1:
                removed += self._strays(name, files, now)
        if self.s3:
            removed += self._abort_uploads(now, also)
        return removed

    def _strays(self, name: str, files: dict[str, dict], now: float) -> list[str]:
        """Objects in a committed checkpoint's prefix that its manifest does not list, at least
        ``stale_s`` old: a sharded save's uploads under another attempt's name (its ranks write
        straight into the prefix) that a crash left there."""
        try:
            listed = json.loads(bytes(self.read(name, MANIFEST, limit=MANIFEST_LIMIT))).get("files")
        except (OSError, ValueError, AttributeError, Unreadable):
            return []  # an unreadable manifest: the checkpoint is judged elsewhere, left as it is
        if not isinstance(listed, dict):
            return []
        strays = [
            f
            for f, i in files.items()
            if f != MANIFEST and f not in listed and now - _mtime(i) >= self.stale_s
        ]
        if strays:
            with contextlib.suppress(OSError):
                self._remove(name, strays)
                return [f"{name}/{f}" for f in strays]
        return []

    def _abort_uploads(self, now: float, also: str | None) -> list[str]:
        bucket, prefix, _ = self.fs.split_path(self.root)
        with _calls(f"listing the uploads in progress under {self.url}"):
            reply = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/")
            aborted = []
            for up in reply.get("Uploads", []) or []:
                key, started = up["Key"], up["Initiated"].timestamp()
                ours = also is not None and key.startswith(f"{prefix}/{also}/")
                if ours or now - started >= self.stale_s:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
                    aborted.append(f"{TMP_PREFIX}upload:{key.rsplit('/', 2)[-2]}")
        return aborted

    def probe(self) -> None:
        """Write, read back and delete one small object: raises what a save would meet, now."""
        path = f"{self.root}/.ftjob-probe-{uuid.uuid4().hex[:8]}"
        with _calls(f"checking {self.url}"):
            if self.s3:  # some stores (SeaweedFS) create a missing bucket on the first PUT
                bucket = self.fs.split_path(self.root)[0]
                try:
                    self.fs.call_s3("head_bucket", Bucket=bucket)
                except FileNotFoundError:
                    raise FileNotFoundError(f"bucket {bucket} does not exist") from None
            self.fs.pipe_file(path, b"ftjob")
            try:
                if self.fs.cat_file(path) != b"ftjob":
                    raise StoreError(f"{self.url}: an object written did not read back")
            finally:
                with contextlib.suppress(Exception):
                    self.fs.rm(path)


def _mtime(info: dict) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def open_storage(location: str) -> FsspecStorage | LocalStorage:
    """The storage of a checkpoint root: a local directory, or a URL."""
    if is_url(location):
        return FsspecStorage(location)
    return LocalStorage(location.removeprefix("file://"))
