"""The shard format: token ids in flat binary files plus one JSON index.

A prepared dataset directory (local path or any fsspec URL) holds:

    index.json                dataset facts + one entry per shard (below), in sample order
    shard-00000-00000.bin     token ids, little-endian uint16 (vocab < 65,536) or uint32
    shard-00000-00000.idx     int64 sample start offsets (n_samples + 1), documents mode only

Shards are named by the input group that made them (`shard-GROUP-K`, see prepare.py), so the parts of a
prepare run on many machines write the same files one process writes.

Two layouts: `chunks` (LLM Foundry's concat-and-chunk: documents joined with EOS and cut into
samples of exactly `seq_len` tokens) and `documents` (one sample per document, for packing).
Each shard records its sha256, checked the first time a reader opens it, so a corrupt or truncated
shard is reported with its path instead of being trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from longboi.config import from_dict
from longboi.errors import UserError

FORMAT = "longboi-shards"
VERSION = 1
Layout = Literal["chunks", "documents"]


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    offsets_file: str | None = None  # documents layout only
    offsets_sha256: str | None = None


@dataclass(frozen=True)
class DatasetIndex:
    format: str
    version: int
    layout: Layout
    dtype: Literal["uint16", "uint32"]
    seq_len: int  # chunks: every sample's length; documents: the longest kept document
    total_tokens: int
    total_samples: int
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    eos_id: int | None
    shards: list[ShardInfo]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @staticmethod
    def from_json(text: str, where: str) -> DatasetIndex:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:{e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{where}: not a longboi dataset index (run `longboi prepare` to make one)")
        if data.get("version") != VERSION:
            raise UserError(f"{where}: dataset format version {data.get('version')}, this longboi reads {VERSION}")
        return from_dict(DatasetIndex, data, where)


def token_dtype(vocab_size: int) -> Literal["uint16", "uint32"]:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """A file appears whole or not at all: a crash mid-write leaves the previous file (or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class ShardWriter:
    """Appends samples to shard files of at most `shard_bytes` named `{prefix}{k:05d}.bin`.

    The index is written last, by whoever holds every writer's shards (`write_index`): it is what makes
    a dataset "complete", as readers look for index.json only.
    """

    def __init__(
        self, directory: Path, layout: Layout, seq_len: int, vocab_size: int, shard_bytes: int, prefix: str = "shard-"
    ):
        self.dir, self.layout, self.seq_len, self.prefix = directory, layout, seq_len, prefix
        self.dtype = np.dtype(token_dtype(vocab_size))
        self.max_tokens = max(seq_len, shard_bytes // self.dtype.itemsize)
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.longest = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, sample: np.ndarray) -> None:
        if self.layout == "chunks" and len(sample) != self.seq_len:
            raise ValueError(f"chunk of {len(sample)} tokens, expected {self.seq_len}")
        if self._pending_tokens + len(sample) > self.max_tokens and self._pending:
            self._flush()
        self._pending.append(sample.astype(self.dtype, copy=False))
        self._pending_tokens += len(sample)
        self.longest = max(self.longest, len(sample))

    def _flush(self) -> None:
        name = f"{self.prefix}{len(self.shards):05d}"
        tokens = np.concatenate(self._pending)
        write_atomic(self.dir / f"{name}.bin", tokens.tobytes())
        offsets_file = offsets_sha = None
        if self.layout == "documents":
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in self._pending])]).astype(np.int64)
            offsets_file = f"{name}.idx"
            write_atomic(self.dir / offsets_file, offsets.tobytes())
            offsets_sha = sha256_file(self.dir / offsets_file)
        self.shards.append(
            ShardInfo(
                file=f"{name}.bin",
                samples=len(self._pending),
                tokens=len(tokens),
                bytes=tokens.nbytes,
                sha256=sha256_file(self.dir / f"{name}.bin"),
                offsets_file=offsets_file,
                offsets_sha256=offsets_sha,
            )
        )
        self._pending, self._pending_tokens = [], 0

    def close(self) -> list[ShardInfo]:
        """Write what is pending; the shards written, in sample order."""
        if self._pending:
            self._flush()
        return self.shards


def write_index(
    directory: Path,
    layout: Layout,
    seq_len: int,
    shards: list[ShardInfo],
    tokenizer_sha256: str,
    tokenizer_vocab_size: int,
    eos_id: int | None,
) -> DatasetIndex:
    """index.json for `shards` (in sample order); `seq_len`: chunks: every sample's; documents: the longest."""
    index = DatasetIndex(
        format=FORMAT,
        version=VERSION,
        layout=layout,
        dtype=token_dtype(tokenizer_vocab_size),
        seq_len=seq_len,
        total_tokens=sum(s.tokens for s in shards),
        total_samples=sum(s.samples for s in shards),
        tokenizer_sha256=tokenizer_sha256,
        tokenizer_vocab_size=tokenizer_vocab_size,
        eos_id=eos_id,
        shards=shards,
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "index.json", index.to_json().encode())
    return index


class ShardReader:
    """Random access to the samples of one local shard (memory-mapped), verified on open."""

    def __init__(self, index: DatasetIndex, shard: ShardInfo, path: Path, verify: bool = True):
        self.index, self.info = index, shard
        if verify:
            _verify(path, shard.bytes, shard.sha256)
        self.tokens = np.memmap(path, dtype=index.dtype, mode="r") if shard.bytes else np.zeros(0, index.dtype)
        self.offsets = None
        if index.layout == "documents":
            assert shard.offsets_file is not None
            offsets_path = path.with_name(shard.offsets_file)
            if verify:
                _verify(offsets_path, 8 * (shard.samples + 1), shard.offsets_sha256)
            self.offsets = np.fromfile(offsets_path, dtype=np.int64)

    def __len__(self) -> int:
        return self.info.samples

    def __getitem__(self, i: int) -> np.ndarray:
        if self.offsets is None:
            n = self.index.seq_len
            return np.asarray(self.tokens[i * n : (i + 1) * n])
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])


def _verify(path: Path, expected_bytes: int, expected_sha: str | None) -> None:
    if not path.is_file():
        raise UserError(f"shard missing: {path}")
    size = path.stat().st_size
    if size != expected_bytes:
        raise UserError(f"corrupt shard {path}: {size} bytes, index.json says {expected_bytes} (truncated?)")
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise UserError(f"corrupt shard {path}: sha256 does not match index.json; re-run `longboi prepare`")
