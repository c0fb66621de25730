"""Moving a checkpoint file's bytes to and from S3 without copies of the file (objstore's S3 path).

Uploads read straight from the caller's buffers (the staging copy of the state): a part is a list
of views into them, handed to botocore as a file-like object, so nothing is concatenated. Downloads
stream each ranged GET into its slice of the one buffer that holds the file, 1 MiB at a time. A
few parts or ranges are in flight at once; beyond the file itself, memory stays at a few MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import Future

READ_PIECE = 1 << 20


class Chain(io.RawIOBase):
    """Read-only, seekable file over a list of buffers (botocore seeks back to retry a part)."""

    def __init__(self, views: list[memoryview]):
        self.views, self.size, self.pos = views, sum(len(v) for v in views), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, [offset, self.pos + offset, self.size + offset][whence])
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        out, skip, n = memoryview(buffer).cast("B"), self.pos, 0
        for view in self.views:
            if skip >= len(view):
                skip -= len(view)
                continue
            take = min(len(view) - skip, len(out) - n)
            out[n : n + take] = view[skip : skip + take]
            n, skip = n + take, 0
            if n == len(out):
                break
        self.pos += n
        return n


def parts(pieces: list[bytes | memoryview], part: int) -> Iterator[list[memoryview]]:
    """The concatenation of ``pieces`` cut into ``part``-byte lists of views (no copies)."""
    current: list[memoryview] = []
    have = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            take = min(part - have, len(view))
            current.append(view[:take])
            have, view = have + take, view[take:]
            if have == part:
                yield current
                current, have = [], 0
    if have:
        yield current


def put(fs, path: str, pieces: list[bytes | memoryview]) -> None:
    bucket, key, _ = fs.split_path(path)
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=Chain([memoryview(p).cast("B") for p in pieces]))
    fs.invalidate_cache(path)


def multipart(fs, path: str, pieces: list[bytes | memoryview], part: int, in_flight: int) -> None:
    """Parallel parts; on any failure the upload is aborted (no invisible debris left behind)."""
    bucket, key, _ = fs.split_path(path)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    kw = {"Bucket": bucket, "Key": key, "UploadId": upload}

    def send(number: int, views: list[memoryview]) -> Future:
        coro = fs._call_s3("upload_part", PartNumber=number, Body=Chain(views), **kw)
        return asyncio.run_coroutine_threadsafe(coro, fs.loop)

    done: list[dict] = []
    pending: list[tuple[int, Future]] = []
    try:
        for number, views in enumerate(parts(pieces, part), start=1):
            if len(pending) >= in_flight:
                n, fut = pending.pop(0)
                done.append({"PartNumber": n, "ETag": fut.result()["ETag"]})
            pending.append((number, send(number, views)))
        done += [{"PartNumber": n, "ETag": fut.result()["ETag"]} for n, fut in pending]
        fs.call_s3("complete_multipart_upload", MultipartUpload={"Parts": done}, **kw)
    except BaseException:
        for _, fut in pending:
            fut.cancel()
        with contextlib.suppress(Exception):  # the store is failing: the debris cleaner aborts it later
            fs.call_s3("abort_multipart_upload", **kw)
        raise
    fs.invalidate_cache(path)


async def _get_into(fs, bucket: str, key: str, start: int, view: memoryview) -> int:
    reply = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + len(view) - 1}"
    )
    body, got = reply["Body"], 0
    try:
        while got < len(view):
            data = await body.read(min(READ_PIECE, len(view) - got))
            if not data:
                break
            view[got : got + len(data)] = data
            got += len(data)
    finally:
        body.close()
    return got


def read_into(
    fs,
    path: str,
    view: memoryview,
    part: int,
    in_flight: int,
    on_chunk: Callable[[memoryview], object] | None,
) -> int:
    """Fill ``view`` (the whole object) with ranged GETs; ``on_chunk`` sees each range, in order."""
    return _ranged(fs, path, len(view), part, in_flight, lambda start, n: view[start : start + n], on_chunk)


def read_through(
    fs, path: str, size: int, part: int, in_flight: int, on_chunk: Callable[[memoryview], object]
) -> int:
    """The object's ``size`` bytes in order, each range handed to ``on_chunk`` in a buffer reused
    once the call returned (in_flight + 1 of ``part`` bytes in all: never the whole object)."""
    ring = [memoryview(bytearray(min(part, size))) for _ in range(min(in_flight + 1, -(-size // part)))]
    into = lambda start, n: ring[start // part % len(ring)][:n]  # noqa: E731
    return _ranged(fs, path, size, part, in_flight, into, on_chunk)


def _ranged(
    fs,
    path: str,
    size: int,
    part: int,
    in_flight: int,
    into: Callable[[int, int], memoryview],
    on_chunk: Callable[[memoryview], object] | None,
) -> int:
    """Ranged GETs of ``part`` bytes, ``in_flight`` at once, each into ``into(start, length)``;
    ``on_chunk`` sees each range in order once it landed (before range start + in_flight * part
    is asked for: a buffer it saw may be reused from then on)."""
    bucket, key, _ = fs.split_path(path)
    pending: list[tuple[int, memoryview, Future]] = []
    got = 0

    def finish() -> None:
        nonlocal got
        start, view, fut = pending.pop(0)
        n = fut.result()
        if n != len(view):
            raise OSError(f"{path}: {n} bytes at offset {start}, expected {len(view)} (changed while read?)")
        got += n
        if on_chunk is not None:
            on_chunk(view)

    try:
        for start in range(0, size, part):
            if len(pending) >= in_flight:
                finish()
            view = into(start, min(part, size - start))
            coro = _get_into(fs, bucket, key, start, view)
            pending.append((start, view, asyncio.run_coroutine_threadsafe(coro, fs.loop)))
        while pending:
            finish()
    finally:
        for _, _, fut in pending:
            fut.cancel()
    return got
