"""A prepare run in parts (`longboi prepare ... --part I/N`) and their merge (`longboi merge-index OUT`).

The inputs are cut into *groups* of about `group_mb` MiB, independently of how many parts there are:
files in sorted order, a large uncompressed jsonl cut at line boundaries near every `group_mb`. A group
is where concat-and-chunk restarts and what names its shards (`shard-GROUP-K.bin`). Its last partial
sample (under seq_len tokens) is kept as `tail-GROUP.bin`; once every group is done, the index joins the
tails in group order into the samples of one last shard (`shard-tails-00000.bin`), so a split drops
under seq_len tokens in all, as one concat-and-chunk would. A group's shards are the same bytes whichever
process makes them, and one process (`prepare` without --part) is simply every group in order: the
merged dataset of N parts is byte for byte the dataset one process writes, and the merge writes only the
tails shards and the index.json files.

A part writes its shards, then its record `parts/part-I-of-N.json` (shard lists, bad-input report and a
fingerprint of the inputs and settings) last. The record is the part's commit: a part starts by
removing its old record, so a part that crashed, and a rerun that crashed, leave no record, and merge
names them. Shard names are fixed by group, so a rerun overwrites the same files with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from longboi.config import from_dict
from longboi.data.shards import ShardInfo, ShardWriter, token_dtype, write_atomic, write_index
from longboi.errors import UserError

GROUP_MB = 64.0  # ~16M tokens per group
RECORD = re.compile(r"part-(\d{5})-of-(\d{5})\.json")


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input file; end None: to the end (compressed and text files are whole)."""

    path: str
    start: int = 0
    end: int | None = None


def part_spec(text: str) -> tuple[int, int]:
    """'I/N' (0-based I, as Slurm's $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT give) -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"--part {text!r}: expected I/N, e.g. 0/4 (part I of N, counted from 0)")
    i, n = int(match[1]), int(match[2])
    if not 0 <= i < n:
        raise UserError(f"--part {text}: I must be in 0..{n - 1} (parts are counted from 0), and N at least 1")
    return i, n


def plan_groups(files: list[Path], kinds: list[str | None], group_bytes: int) -> tuple[list[list[Piece]], list[int]]:
    """The inputs as groups of pieces, in order, and each group's input bytes: the same for every part,
    whatever N is."""
    groups: list[list[Piece]] = []
    sizes: list[int] = []
    current: list[Piece] = []
    size = 0
    for path, kind in zip(files, kinds):
        for piece, piece_bytes in _pieces(path, kind, group_bytes):
            current.append(piece)
            size += piece_bytes
            if size >= group_bytes:
                groups.append(current)
                sizes.append(size)
                current, size = [], 0
    if current:
        groups.append(current)
        sizes.append(size)
    return groups, sizes


def _pieces(path: Path, kind: str | None, group_bytes: int) -> list[tuple[Piece, int]]:
    """A file as pieces of about group_bytes: jsonl that can be seeked is cut after the line that crosses
    each multiple of group_bytes; other files are one piece (a text file is one document)."""
    total = path.stat().st_size
    if kind != "jsonl" or path.suffix in (".gz", ".zst") or total <= group_bytes:
        return [(Piece(str(path)), total)]
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(group_bytes, total, group_bytes):
            if target <= cuts[-1]:
                continue
            f.seek(target - 1)
            f.readline()  # to the end of the line holding byte target - 1
            if f.tell() >= total:
                break
            cuts.append(f.tell())
    bounds = cuts + [total]
    return [(Piece(str(path), a, b if b < total else None), b - a) for a, b in zip(bounds, bounds[1:])]


def assigned(groups: list[list[Piece]], sizes: list[int], part: int, parts: int) -> list[int]:
    """The groups of one part: contiguous runs balanced by input bytes (group g goes to the part its
    middle byte falls in)."""
    total = max(sum(sizes), 1)
    mine, at = [], 0
    for g, size in enumerate(sizes):
        if min(parts - 1, (2 * at + size) * parts // (2 * total)) == part:
            mine.append(g)
        at += size
    return mine


def fingerprint(settings: dict, groups: list[list[Piece]]) -> str:
    """What every part must agree on: the settings and the plan (paths, sizes and byte ranges)."""
    plan = [[(p.path, Path(p.path).stat().st_size, p.start, p.end) for p in g] for g in groups]
    text = json.dumps({"settings": settings, "plan": plan}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def record_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}.json"


@dataclass
class GroupOutput:
    """One split of one group: its shards in order, its longest sample, and the tokens of its last
    partial sample (chunks layout), kept in `tail_name(group)` for the tails shard."""

    shards: list[ShardInfo]
    longest: int = 0
    tail_tokens: int = 0


def tail_name(group: int) -> str:
    return f"tail-{group:05d}.bin"


def write_record(directory: Path, part: int, parts: int, meta: dict, outputs: dict, report: dict) -> Path:
    record = {
        "format": "longboi-prepare-part",
        "part": part,
        "parts": parts,
        "meta": meta,
        "groups": {str(g): {s: asdict(o) for s, o in splits.items()} for g, splits in outputs.items()},
        "report": report,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / record_name(part, parts)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    return path


def write_indexes(
    out: Path, meta: dict, outputs: dict[int, dict[str, GroupOutput]], read: Callable[[str], bytes]
) -> tuple[dict, int]:
    """Each split's index.json over every group in order, then the tails shard (written under `out`;
    `read(relative path)` reads a group's tail where the parts wrote it); ({split: DatasetIndex}, tokens
    dropped in all). A split without a sample is an error (the input is shorter than one sample)."""
    indexes, dropped = {}, 0
    for split in meta["splits"]:
        shards = [s for g in sorted(outputs) for s in outputs[g][split].shards]
        if meta["layout"] == "chunks":
            tails, left = _tails_shard(out / split, split, meta, outputs, read)
            shards, dropped = shards + tails, dropped + left
        longest = max((outputs[g][split].longest for g in outputs), default=0)
        seq_len = meta["seq_len"] if meta["layout"] == "chunks" else longest
        if not any(s.samples for s in shards):
            raise UserError(
                f"{split} split has no samples: the input has fewer than seq_len={meta['seq_len']} tokens "
                f"(lower seq_len or val_fraction)"
            )
        indexes[split] = write_index(
            out / split,
            meta["layout"],
            seq_len,
            shards,
            meta["tokenizer_sha256"],
            meta["vocab_size"],
            meta["eos_id"],
        )
    return indexes, dropped


def _tails_shard(directory: Path, split: str, meta: dict, outputs: dict, read) -> tuple[list[ShardInfo], int]:
    """The groups' last partial samples joined in group order and cut into samples: at most one shard,
    and the tokens left over."""
    dtype, seq_len = np.dtype(token_dtype(meta["vocab_size"])), meta["seq_len"]
    tails = []
    for g in sorted(outputs):
        want = outputs[g][split].tail_tokens
        if want:
            data = read(f"{split}/{tail_name(g)}")
            if len(data) != want * dtype.itemsize:
                raise UserError(f"{split}/{tail_name(g)}: {len(data)} bytes, expected {want * dtype.itemsize}; "
                                f"rerun the part that holds group {g}")  # fmt: skip
            tails.append(np.frombuffer(data, dtype=dtype))
    tokens = np.concatenate(tails) if tails else np.zeros(0, dtype=dtype)
    n = len(tokens) // seq_len
    if n == 0:
        return [], len(tokens)
    writer = ShardWriter(directory, "chunks", seq_len, meta["vocab_size"], tokens.nbytes, prefix="shard-tails-")
    for i in range(n):
        writer.add(tokens[i * seq_len : (i + 1) * seq_len])
    return writer.close(), len(tokens) - n * seq_len


def merge_index(out: str) -> tuple[dict, dict]:
    """Check that every part of the run under `out` is present, complete and of the same run, then
    write the index.json files. Returns ({split: DatasetIndex}, the summed bad-input report)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    records = _read_records(fs, root, out)
    parts = records[0]["parts"]
    first = records[0]
    outputs: dict[int, dict[str, GroupOutput]] = {}
    holder: dict[int, int] = {}
    for r in records:
        if r["meta"] != first["meta"]:
            changed = sorted(k for k in first["meta"] if r["meta"].get(k) != first["meta"][k])
            raise UserError(
                f"{out}/parts/{record_name(r['part'], parts)} is from another run than part 0 (differs in: "
                f"{', '.join(changed)}); rerun whichever of the two is stale with the same inputs and options"
            )
        for g, splits in r["groups"].items():
            if int(g) in holder:
                raise UserError(
                    f"{out}: group {g} is in the records of parts {holder[int(g)]} and {r['part']} of {parts}; "
                    "a record was copied or edited: rerun both parts"
                )
            holder[int(g)] = r["part"]
            outputs[int(g)] = {
                s: GroupOutput([from_dict(ShardInfo, x, f"{out} part {r['part']}") for x in o["shards"]], o["longest"],
                               o["tail_tokens"])
                for s, o in splits.items()
            }  # fmt: skip
    missing = sorted(set(range(first["meta"]["groups"])) - set(outputs))
    if missing:
        raise UserError(f"{out}: no part record holds input groups {missing}; rerun every part")
    _check_shards(fs, root, out, outputs)
    report = _summed_reports([r["report"] for r in records], outputs)
    if report["documents"] == 0:
        raise UserError(
            f"no documents found in the inputs of {out} (empty input{', all skipped' if report['skipped'] else ''})"
        )
    from fsspec.implementations.local import LocalFileSystem

    read = lambda rel: fs.cat_file(f"{root}/{rel}")  # noqa: E731
    if isinstance(fs, LocalFileSystem):  # written in place, atomically
        indexes, report["dropped_tail_tokens"] = write_indexes(Path(root), first["meta"], outputs, read)
        return indexes, report
    local = Path(tempfile.mkdtemp(prefix="longboi-merge-"))
    indexes, report["dropped_tail_tokens"] = write_indexes(local, first["meta"], outputs, read)
    for split in indexes:  # the tails shard, then the index
        names = sorted(p.name for p in (local / split).iterdir() if p.name != "index.json") + ["index.json"]
        for name in names:
            fs.put_file(str(local / split / name), f"{root}/{split}/{name}")
    shutil.rmtree(local, ignore_errors=True)
    return indexes, report


def _read_records(fs, root: str, out: str) -> list[dict]:
    """Every part's record, in part order; a clear error for a missing, mixed or unreadable one."""
    found = {}
    for name in fs.ls(f"{root}/parts", detail=False) if fs.isdir(f"{root}/parts") else []:
        match = RECORD.fullmatch(Path(name).name)
        if match:
            found[(int(match[1]), int(match[2]))] = name
    if not found:
        raise UserError(
            f"{out}: no part records under {out}/parts (run `longboi prepare ... --out {out} --part I/N` first)"
        )
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise UserError(
            f"{out}/parts holds records of runs in {' and '.join(map(str, counts))} parts; delete the stale ones"
        )
    parts = counts[0]
    missing = [i for i in range(parts) if (i, parts) not in found]
    if missing:
        names = ", ".join(f"{i} ({record_name(i, parts)})" for i in missing)
        raise UserError(
            f"{out}: part{'s' if len(missing) > 1 else ''} {names} of {parts} not finished: "
            f"run `longboi prepare ... --part {missing[0]}/{parts}` (a part writes its record last)"
        )
    records = []
    for i in range(parts):
        where = f"{out}/parts/{record_name(i, parts)}"
        try:
            record = json.loads(fs.cat_file(found[(i, parts)]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: not a readable part record ({e}); rerun part {i}/{parts}") from e
        if not isinstance(record, dict) or record.get("format") != "longboi-prepare-part":
            raise UserError(f"{where}: not a longboi part record; rerun part {i}/{parts}")
        records.append(record)
    return records


def _check_shards(fs, root: str, out: str, outputs: dict[int, dict[str, GroupOutput]]) -> None:
    """Every shard a record lists is there with its size (a cheap listing, not a read of the data)."""
    for split in next(iter(outputs.values()), {}):
        listing = fs.ls(f"{root}/{split}", detail=True) if fs.isdir(f"{root}/{split}") else []
        sizes = {Path(x["name"]).name: x["size"] for x in listing}
        for g in sorted(outputs):
            for shard in outputs[g][split].shards:
                for name, size in [(shard.file, shard.bytes)] + (
                    [(shard.offsets_file, 8 * (shard.samples + 1))] if shard.offsets_file else []
                ):
                    if sizes.get(name) != size:
                        got = "missing" if name not in sizes else f"{sizes[name]} bytes, expected {size}"
                        raise UserError(
                            f"{out}/{split}/{name} ({got}) of group {g}: rerun the part that holds group {g}"
                        )


def _summed_reports(reports: list[dict], outputs: dict) -> dict:
    total = {k: 0 for k in ("documents", "bytes_read", "skipped", "tokens_read")}
    for r in reports:
        for k in total:
            total[k] += r[k]
    total["files"] = reports[0]["files"]
    total["skip_examples"] = [x for r in reports for x in r["skip_examples"]][:10]
    total["seconds"] = max(r["seconds"] for r in reports)  # the parts ran side by side
    return total
