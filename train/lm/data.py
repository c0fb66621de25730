"""Byte-level text corpus: prepared once into token files in a cache dir, read as fixed windows.

The default corpus is this Python's own standard library sources, which exist wherever Python does.
Preparation is deterministic (sorted paths) and atomic (temp file + rename), so ranks racing to
prepare the same corpus all end up reading identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import sysconfig
from pathlib import Path

import torch

from train.errors import ConfigError, DataError
from train.runtime import private

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".ini", ".c", ".h"}


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} does not exist; set --data.path to a text file or folder")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES and not skip.intersection(p.relative_to(root).parts)
    ]
    if not files:
        raise DataError(f"no text files under {str(root)!r}; set --data.path to a folder with text files")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def prepare(path: str | None, cache_dir: str, val_every: int) -> tuple[Path, Path]:
    """Return (train.bin, val.bin), building them in the cache if they are not there yet."""
    root = Path(path).expanduser().resolve() if path else default_corpus_root()
    key = hashlib.sha256(f"{root}\0val_every={val_every}\0".encode())
    if path is None:
        # The standard library does not change under an installed Python: naming the interpreter
        # is enough, and skips stat()ing thousands of files on every (re)start.
        key.update(f"{sys.version}\0{sys.platform}".encode())
        sources = None
    else:
        sources = list_sources(root)
        for p in sources:
            st = p.stat()
            key.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    out = _private_cache(Path(cache_dir).expanduser()) / f"corpus-{key.hexdigest()[:16]}"
    train_bin, val_bin = out / "train.bin", out / "val.bin"
    if _ours(out) and _ours(train_bin) and _ours(val_bin):
        return train_bin, val_bin
    sources = sources or list_sources(root)
    out.mkdir(exist_ok=True)
    if not _ours(out):
        raise ConfigError(f"--data.cache-dir: {out} is not a directory of your own; remove it or use another")
    splits: dict[Path, list[bytes]] = {train_bin: [], val_bin: []}
    for i, p in enumerate(sources):
        # Every val_every-th file is held out; a one-file corpus is split by bytes instead.
        splits[val_bin if len(sources) > 1 and i % val_every == val_every - 1 else train_bin].append(
            p.read_bytes()
        )
    if len(sources) == 1:
        blob = splits[train_bin][0]
        cut = len(blob) - max(len(blob) // val_every, 1)
        splits = {train_bin: [blob[:cut]], val_bin: [blob[cut:]]}
    for target, parts in splits.items():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"\n".join(parts))
        os.replace(tmp, target)
    return train_bin, val_bin


def _private_cache(root: Path) -> Path:
    """The cache root, once nobody else could write it or swap it (train/runtime/private.py)."""
    try:
        return private.trusted_tree(root, create=True)
    except (private.Untrusted, OSError) as e:
        raise ConfigError(f"--data.cache-dir: {e}; set --data.cache-dir to a directory of your own") from None


def _ours(path: Path) -> bool:
    """A prepared file (or its directory) this user made, that nobody else could have changed."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.getuid() and not st.st_mode & 0o022


class TokenWindows:
    """Sample i is bytes [i*L, i*L + L + 1): input is the first L, target the last L."""

    def __init__(self, path: Path, seq_len: int):
        size = path.stat().st_size
        if size < seq_len + 1:
            raise DataError(
                f"{path} has {size} bytes, fewer than --data.seq-len + 1 = {seq_len + 1}; use more text"
            )
        self.tokens = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]
