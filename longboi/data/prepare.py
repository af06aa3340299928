"""`longboi prepare`: text / jsonl (optionally .gz / .zst) -> tokenized shards (see `shards.py`).

Documents are read in the main process (so errors can name file and line), tokenized in a pool of
worker processes in order, joined with EOS and cut into `seq_len` samples (`chunks`) or kept whole
(`documents`). The validation split is the last `val_fraction` of each input file (nanoGPT-style: a
contiguous held-out tail, so no validation text sits between training samples of the same file); a
jsonl file larger than a group (`group_mb`, see parts.py) holds out the tail of each of its pieces.
The work is done group by group, so any number of parts (`part=(I, N)`) writes the same shards.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
from tqdm import tqdm

from longboi.data.parts import (
    GROUP_MB,
    GroupOutput,
    Piece,
    assigned,
    fingerprint,
    merge_index,
    plan_groups,
    record_name,
    tail_name,
    write_indexes,
    write_record,
)
from longboi.data.shards import Layout, ShardWriter, write_atomic
from longboi.errors import UserError, check_output_location
from longboi.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED = (".gz", ".zst")
SNIFF_BYTES = 64 * 1024  # how much of a suffix-less file decides text, jsonl or binary
BATCH_CHARS = 1 << 21  # text per tokenization job: large enough to amortize IPC, small enough to stream
OnBadInput = Literal["error", "skip"]


@dataclass
class Document:
    file: str
    text: str


@dataclass
class PrepareReport:
    files: int = 0
    documents: int = 0
    bytes_read: int = 0
    skipped: int = 0
    skip_examples: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    dropped_tail_tokens: int = 0
    tokens_read: int = 0
    seconds: float = 0.0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skip_examples) < 10:
            self.skip_examples.append(reason)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> a sorted, de-duplicated file list.

    Read: the suffixes in TEXT_SUFFIXES and JSONL_SUFFIXES (optionally compressed), and files with no
    suffix at all (`split` writes part00, xaa, ...), which are read as text, or as jsonl when their
    first line is a JSON object, and skipped when binary. A directory's other files are skipped and
    counted in the error when nothing is left.
    """
    found: list[Path] = []
    skipped: dict[str, int] = {}
    for item in inputs:
        matches = [Path(p) for p in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for path in matches:
            if path.is_dir():
                for p in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                    if _kind(p) is None:
                        key = "".join(p.suffixes[-2:]) or "binary files without a suffix"
                        skipped[key] = skipped.get(key, 0) + 1
                    else:
                        found.append(p)
            elif path.is_file():
                if _kind(path) is None:
                    raise UserError(f"{path}: unsupported input type ({_READ})")
                found.append(path)
            else:
                raise UserError(f"input not found: {item}")
    unique = list(dict.fromkeys(found))
    if not unique:
        others = ", ".join(f"{n} x {k}" for k, n in sorted(skipped.items()))
        raise UserError(f"no input files found in {inputs} ({_READ}{'; skipped: ' + others if others else ''})")
    return unique


_READ = (
    f"read: {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, optionally {' or '.join(COMPRESSED)}-compressed, and files "
    "without a suffix that hold text; rename or link other text files to .txt"
)


def _kind(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    base = suffixes[0] if suffixes and suffixes[0] not in COMPRESSED else ""
    if base:
        return "text" if base in TEXT_SUFFIXES else "jsonl" if base in JSONL_SUFFIXES else None
    return _sniff(path)


@functools.lru_cache(maxsize=4096)  # asked per file by the listing and again by each worker that reads it
def _sniff(path: Path) -> str | None:
    """A file without a suffix: "jsonl" if its first non-empty line is a JSON object, "text" if its head
    is UTF-8 without NUL bytes, None (binary) otherwise. Decided from the content alone, so every worker
    that asks decides the same."""
    with _open_binary(path) as raw:
        head = raw.read(SNIFF_BYTES)
    if b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the sample
            return None
        text = head[: e.start].decode("utf-8")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(first), dict):
                return "jsonl"
    return "text"


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def iter_documents(
    path: Path,
    text_field: str,
    split_on: str | None,
    on_bad: OnBadInput,
    report: PrepareReport,
    piece: Piece | None = None,
) -> Iterator[Document]:
    """The documents of one file (or of the byte range `piece` of a jsonl file), with bad input raised or
    counted (file:line in both cases)."""
    with _open_binary(path) as raw:
        if _kind(path) == "jsonl":
            yield from _jsonl_documents(path, raw, text_field, on_bad, report, piece or Piece(str(path)))
        else:
            data = raw.read()
            report.bytes_read += len(data)
            text = _decode(data, path, on_bad, report)
            if text is not None:
                pieces = text.split(split_on) if split_on else [text]
                for part in pieces:
                    if part.strip():
                        yield Document(str(path), part.strip("\n") if split_on else part)


def _decode(data: bytes, path: Path, on_bad: OnBadInput, report: PrepareReport, line: int | None = None) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data[: e.start].count(b"\n") + 1
        return _bad(f"{path}:{at}: invalid UTF-8 (byte {data[e.start]:#04x})", on_bad, report)


def _bad(reason: str, on_bad: OnBadInput, report: PrepareReport) -> None:
    if on_bad == "error":
        raise UserError(reason + " (use --on-bad-input skip to count and skip such input)")
    report.skip(reason)
    return None


def _jsonl_documents(
    path: Path, raw: IO[bytes], text_field: str, on_bad: OnBadInput, report: PrepareReport, piece: Piece
) -> Iterator[Document]:
    if piece.start:
        raw.seek(piece.start)
    line_of = _line_numbers(path, piece.start)
    at = piece.start
    for number, line_bytes in enumerate(io.BufferedReader(raw) if not hasattr(raw, "peek") else raw, start=1):
        if piece.end is not None and at >= piece.end:
            break
        at += len(line_bytes)
        report.bytes_read += len(line_bytes)
        if not line_bytes.strip():
            continue
        line = _decode(line_bytes, path, on_bad, report, line_of(number))
        if line is None:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(f"{path}:{line_of(number)}: invalid JSON ({e.msg})", on_bad, report)
            continue
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            keys = list(row) if isinstance(row, dict) else type(row).__name__
            _bad(
                f"{path}:{line_of(number)}: no string field {text_field!r} (has {keys}; set --text-field)",
                on_bad,
                report,
            )
            continue
        yield Document(str(path), text)


def _line_numbers(path: Path, start: int) -> Callable[[int], int]:
    """Line n of a piece starting at byte `start` -> line number in the file. The lines before the piece
    are counted only when a message needs one (a piece of a large file may start gigabytes in)."""
    base: list[int] = []

    def line_of(n: int) -> int:
        if not base:
            count = 0
            with open(path, "rb") as f:
                left = start
                while left > 0 and (block := f.read(min(left, 1 << 24))):
                    count += block.count(b"\n")
                    left -= len(block)
            base.append(count)
        return base[0] + n

    return (lambda n: n) if start == 0 else line_of


# ---------------------------------------------------------------------------------------------
# Tokenization in worker processes. Each worker loads the tokenizer once.

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_tokenizer.encode_batch(texts)]


def _encode(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint32) for ids in tok.encode_batch(texts)]


@contextlib.contextmanager
def _tokenizer_map(tok: Tokenizer, workers: int) -> Iterator[Callable[[Iterator[list[str]]], Iterator]]:
    """A function mapping batches of texts to token arrays, in order, one batch ahead of the reader."""
    if workers > 0:
        with mp.get_context("fork").Pool(workers, _init_worker, (str(tok.path),)) as pool:
            yield lambda batches: pool.imap(_tokenize, batches)
        return
    with ThreadPoolExecutor(max_workers=1) as executor:  # encode_batch drops the GIL and uses all cores

        def pipelined(batches: Iterator[list[str]]) -> Iterator[list[np.ndarray]]:
            pending = None
            for texts in batches:
                submitted = executor.submit(_encode, tok, texts)
                if pending is not None:
                    yield pending.result()
                pending = submitted
            if pending is not None:
                yield pending.result()

        yield pipelined


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Splitter:
    """Routes one file's tokenized documents: the file's last `val_fraction` of tokens go to validation."""

    def __init__(self, val_fraction: float, eos_id: int | None):
        self.val_fraction, self.eos = val_fraction, eos_id
        self.docs: list[np.ndarray] = []

    def add(self, ids: np.ndarray) -> None:
        self.docs.append(np.append(ids, self.eos).astype(np.uint32) if self.eos is not None else ids)

    def split(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        docs, self.docs = self.docs, []
        if self.val_fraction <= 0 or not docs:
            return docs, []
        total = sum(len(d) for d in docs)
        want = int(round(total * self.val_fraction))
        if len(docs) == 1:  # a single document (one big text file): split its token stream
            cut = len(docs[0]) - want
            return [docs[0][:cut]], [docs[0][cut:]]
        val, taken = [], 0
        while docs and taken < want and len(docs) > 1:
            val.insert(0, docs.pop())
            taken += len(val[0])
        return docs, val


class _Chunker:
    """Concatenate token arrays and emit fixed `seq_len` samples (LLM Foundry's concat-and-chunk)."""

    def __init__(self, writer: ShardWriter, seq_len: int):
        self.writer, self.seq_len = writer, seq_len
        self.buffer = np.zeros(0, dtype=np.uint32)

    def add(self, ids: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, ids])
        n = len(self.buffer) // self.seq_len
        for i in range(n):
            self.writer.add(self.buffer[i * self.seq_len : (i + 1) * self.seq_len])
        self.buffer = self.buffer[n * self.seq_len :]


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str,
    seq_len: int = 2048,
    layout: Layout = "chunks",
    text_field: str = "text",
    split_on: str | None = None,
    val_fraction: float = 0.0,
    shard_mb: float = 64.0,
    workers: int = 0,
    on_bad_input: OnBadInput = "error",
    max_doc_tokens: int | None = None,
    part: tuple[int, int] | None = None,
    group_mb: float = GROUP_MB,
) -> PrepareReport:
    """Tokenize text/jsonl files into shards under `out` (a local path or fsspec URL): `out/train`, `out/val`.

    `part=(I, N)`: only part I of N of the input groups (see parts.py), writing its shards and the record
    `out/parts/part-I-of-N.json`; `merge_index(out)` writes the index once every part has run.
    """
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not (math.isfinite(group_mb) and group_mb > 0):
        raise UserError(f"group_mb must be a positive number of MiB, got {group_mb}")
    if "://" not in out:  # before any tokenizing; object storage says what is wrong at its first write
        check_output_location(Path(out) / "train")
    tok = Tokenizer(tokenizer)
    files = expand_inputs(inputs)
    groups, sizes = plan_groups(files, [_kind(f) for f in files], max(1, int(group_mb * 2**20)))
    index, parts = part or (0, 1)
    mine = assigned(groups, sizes, index, parts)
    settings = dict(
        seq_len=seq_len, layout=layout, text_field=text_field, split_on=split_on, val_fraction=val_fraction,
        shard_mb=shard_mb, on_bad_input=on_bad_input, max_doc_tokens=max_doc_tokens, group_mb=group_mb,
    )  # fmt: skip
    meta = dict(
        layout=layout, seq_len=seq_len, splits=["train", "val"] if val_fraction > 0 else ["train"],
        tokenizer_sha256=tok.sha256(), vocab_size=tok.vocab_size, eos_id=tok.eos_id, groups=len(groups),
        fingerprint=fingerprint(settings | {"tokenizer_sha256": tok.sha256()}, groups),
    )  # fmt: skip
    local_out, remote = _local_output(out, part)
    report = PrepareReport(files=len(files))
    run = functools.partial(_prepare_group, tok=tok, meta=meta, out=local_out, settings=settings, report=report)
    outputs = _prepare_groups(run, {g: groups[g] for g in mine}, sizes, tok, workers, report)
    if part is not None:
        write_record(local_out / "parts", index, parts, meta, outputs, asdict(report))
    else:
        if report.documents == 0:
            raise UserError(f"no documents found in {inputs} (empty input{', all skipped' if report.skipped else ''})")
        read = lambda rel: (local_out / rel).read_bytes()  # noqa: E731
        indexes, report.dropped_tail_tokens = write_indexes(local_out, meta, outputs, read)
        _count_samples(report, indexes)
    if remote:
        _upload(local_out, out)
    return report


def _prepare_groups(run, mine: dict, sizes: list[int], tok: Tokenizer, workers: int, report: PrepareReport) -> dict:
    """Run `run(g, pieces, tokenize=...)` for each of this part's groups in order, with a progress bar."""
    start = time.perf_counter()
    outputs = {}
    with (
        _tokenizer_map(tok, workers) as tokenize,
        tqdm(total=sum(sizes[g] for g in mine), unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True) as bar,
    ):
        for g, pieces in mine.items():
            outputs[g] = run(g, pieces, tokenize=tokenize)
            bar.update(sizes[g])
            bar.set_postfix(tok_s=f"{report.tokens_read / max(time.perf_counter() - start, 1e-9):,.0f}")
    report.seconds = time.perf_counter() - start
    return outputs


def _prepare_group(
    g: int, pieces: list[Piece], tok: Tokenizer, meta: dict, out: Path, tokenize, settings: dict, report: PrepareReport
) -> dict[str, GroupOutput]:
    """One group: each piece's documents tokenized, its tail routed to validation, then concatenated and
    chunked (chunks) or kept whole (documents) into the group's own shards."""
    layout, seq_len, max_doc = meta["layout"], meta["seq_len"], settings["max_doc_tokens"]
    shard_bytes = int(settings["shard_mb"] * 2**20)
    writers = {
        s: ShardWriter(out / s, layout, seq_len, tok.vocab_size, shard_bytes, prefix=f"shard-{g:05d}-")
        for s in meta["splits"]
    }
    chunkers = {s: _Chunker(w, seq_len) for s, w in writers.items()}
    for piece in pieces:
        path = Path(piece.path)
        splitter = _Splitter(settings["val_fraction"], tok.eos_id)
        docs = iter_documents(
            path, settings["text_field"], settings["split_on"], settings["on_bad_input"], report, piece
        )
        for ids in tokenize([d.text for d in batch] for batch in _batches(docs)):
            for arr in ids:
                if max_doc is not None and len(arr) > max_doc:
                    report.skip(f"{path}: a document of {len(arr)} tokens > max_doc_tokens={max_doc}")
                    continue
                splitter.add(arr)
                report.documents += 1
                report.tokens_read += len(arr)
        for split, arrays in zip(("train", "val"), splitter.split()):
            for arr in arrays:
                (chunkers[split] if layout == "chunks" else writers[split]).add(arr)
    outputs = {}
    for s, w in writers.items():
        tail = chunkers[s].buffer if layout == "chunks" else np.zeros(0, dtype=np.uint32)
        if len(tail):  # carried to the tails shard at the end (see parts.py)
            write_atomic(out / s / tail_name(g), tail.astype(w.dtype).tobytes())
        outputs[s] = GroupOutput(w.close(), w.longest, len(tail))
    return outputs


def merge(out: str) -> PrepareReport:
    """`longboi merge-index`: the index of a prepare run made in parts (see parts.py), with the parts'
    bad-input reports summed."""
    indexes, summed = merge_index(out)
    report = PrepareReport(**summed)
    _count_samples(report, indexes)
    return report


def _count_samples(report: PrepareReport, indexes: dict) -> None:
    for split, idx in indexes.items():
        report.tokens[split], report.samples[split] = idx.total_tokens, idx.total_samples


def _local_output(out: str, part: tuple[int, int] | None) -> tuple[Path, bool]:
    """Where to write: `out` itself when local, else a temp dir uploaded at the end. A whole run starts
    from an empty output; a part removes only its own record (its commit) and any stale index."""
    remote = "://" in out and not out.startswith("file://")
    path = Path(out.removeprefix("file://"))
    if part is None and not remote:
        for stale in ("train", "val", "parts"):
            if (path / stale).exists():
                shutil.rmtree(path / stale)
        return path, False
    _forget(out, part)
    return (Path(tempfile.mkdtemp(prefix="longboi-prepare-")), True) if remote else (path, False)


def _forget(out: str, part: tuple[int, int] | None) -> None:
    """Before a part: its own record and any index. Before a whole remote run: every part record too, so a
    later merge-index cannot build an index from another run's records."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    if part is None and fs.isdir(f"{root}/parts"):
        fs.rm(f"{root}/parts", recursive=True)
    for name in ([f"parts/{record_name(*part)}"] if part else []) + ["train/index.json", "val/index.json"]:
        if fs.exists(f"{root}/{name}"):
            fs.rm_file(f"{root}/{name}")


def _upload(local: Path, url: str) -> None:
    """Copy shards first and each index.json (or part record) last, so a reader never sees an index
    without its shards."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    last = [p for p in files if p.name == "index.json" or p.parent.name == "parts"]
    for f in [p for p in files if p not in last] + last:
        fs.put_file(str(f), f"{root}/{f.relative_to(local).as_posix()}")
    shutil.rmtree(local, ignore_errors=True)
