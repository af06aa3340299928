import gzip
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import SHARED

from longboi.cli import main
from longboi.data.prepare import prepare
from longboi.data.shards import DatasetIndex
from longboi.data.stream import CacheConfig, Source, StreamingDataset, StreamLoader
from longboi.errors import UserError
from longboi.tokenizer import Tokenizer

SHAKESPEARE = SHARED / "text" / "tinyshakespeare.txt"
STORIES = SHARED / "text" / "tinystories_sample.txt"


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare([str(SHAKESPEARE)], str(out), str(tokenizer_path), seq_len=64, val_fraction=0.1, shard_mb=0.05)
    return out


def test_prepare_concat_and_chunk_is_lossless(shakespeare, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    train = DatasetIndex.from_json((shakespeare / "train" / "index.json").read_text(), "x")
    val = DatasetIndex.from_json((shakespeare / "val" / "index.json").read_text(), "x")
    assert train.dtype == "uint16" and train.layout == "chunks" and train.seq_len == 64
    assert len(train.shards) > 5 and train.tokenizer_sha256 == tok.sha256()
    expected = np.array(tok.encode(SHAKESPEARE.read_text()) + [tok.eos_id])
    got = np.concatenate(
        [
            np.fromfile(shakespeare / s / sh.file, dtype=np.uint16)
            for s, idx in (("train", train), ("val", val))
            for sh in idx.shards
        ]
    )
    cut = len(expected) - int(round(len(expected) * 0.1))  # the last 10% of tokens is validation
    assert np.array_equal(got[: train.total_tokens], expected[: train.total_tokens])
    assert np.array_equal(got[train.total_tokens :], expected[cut : cut + val.total_tokens])
    assert 0.09 < val.total_tokens / (train.total_tokens + val.total_tokens) < 0.11
    assert tok.decode(got[:4]).startswith("First Citizen")


def test_prepare_jsonl_compressed_and_documents_layout(tmp_path, tokenizer_path):
    rows = [{"text": f"Story number {i}. " * (i + 1)} for i in range(50)]
    plain = tmp_path / "in" / "a.jsonl"
    plain.parent.mkdir()
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gz = tmp_path / "gz" / "a.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "zst" / "a.jsonl.zst"
    zst.parent.mkdir()
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for src in (plain.parent, gz, zst):
        prepare([str(src)], str(tmp_path / f"out-{src.name}"), str(tokenizer_path), layout="documents", workers=1)
    files = [tmp_path / f"out-{p}" / "train" / "shard-00000-00000.bin" for p in ("in", gz.name, zst.name)]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    ds = StreamingDataset(str(tmp_path / "out-in" / "train"), shuffle=False)
    tok = Tokenizer(tokenizer_path)
    assert [tok.decode(ds[i]["input_ids"].tolist()) for i in range(3)] == [r["text"] for r in rows[:3]]


def test_prepare_text_split_on_separator(tmp_path, tokenizer_path):
    prepare([str(STORIES)], str(tmp_path / "o"), str(tokenizer_path), layout="documents", split_on="<|endoftext|>")
    idx = DatasetIndex.from_json((tmp_path / "o" / "train" / "index.json").read_text(), "x")
    assert idx.total_samples == STORIES.read_text().count("<|endoftext|>") + 1 - STORIES.read_text().strip().endswith(
        "<|endoftext|>"
    )


@pytest.mark.parametrize(
    "content, field, message",
    [
        (b'{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', "text", r"a.jsonl:3: invalid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', "text", r"a.jsonl:2: no string field 'text' \(has \['body'\]"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "text", r"a.jsonl:2: invalid UTF-8 \(byte 0xe9\)"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, tokenizer_path, content, field, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare([str(path)], str(tmp_path / "o"), str(tokenizer_path), seq_len=2, workers=1)
    report = prepare([str(path)], str(tmp_path / "o"), str(tokenizer_path), seq_len=2, workers=1, on_bad_input="skip")
    assert report.skipped == 1 and report.documents == content.count(b"\n") - 1
    assert message.replace("\\", "").split(":")[1] in report.skip_examples[0]


def test_bad_text_and_empty_inputs(tmp_path, tokenizer_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xff\xfe\n")
    with pytest.raises(UserError, match=r"bad.txt:2: invalid UTF-8"):
        prepare([str(bad)], str(tmp_path / "o"), str(tokenizer_path), workers=1)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["prepare", str(empty), "--out", str(tmp_path / "o"), "--tokenizer", str(tokenizer_path)]) == 2
    assert "no documents found" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "nope.txt"), "--out", "o", "--tokenizer", str(tokenizer_path)]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported input type"):
        prepare([str(tmp_path / "x.csv")], str(tmp_path / "o"), str(tokenizer_path))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match="fewer than seq_len"):
        prepare([str(short)], str(tmp_path / "o"), str(tokenizer_path), seq_len=2048, workers=1)


def test_corrupt_and_truncated_shards_are_detected(shakespeare, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shakespeare / "train", copy)
    shard = copy / "shard-00000-00002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = StreamingDataset(str(copy), shuffle=False)
    ds[0]  # shard 0 is fine
    first_of_2 = int(ds.data[0].shard_starts[2])
    with pytest.raises(UserError, match=r"corrupt shard .*shard-00000-00002.bin: sha256"):
        ds[first_of_2]
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match=r"shard-00000-00002.bin: .* bytes, index.json says .* \(truncated\?\)"):
        StreamingDataset(str(copy), shuffle=False)[first_of_2]


def _global_stream(ds, global_batch, steps, world, workers=0, micro=None):
    """What each global step contains when `world` ranks each read their slice."""
    per_rank = global_batch // world
    loaders = [
        StreamLoader(
            ds,
            global_batch,
            micro or per_rank,
            rank=r,
            world_size=world,
            num_workers=workers,
            stop=global_batch * steps,
        )
        for r in range(world)
    ]
    per_rank_batches = [torch.cat(list(loader)) for loader in loaders]
    return torch.cat([b.view(steps, per_rank, -1) for b in per_rank_batches], dim=1).view(steps * global_batch, -1)


def test_order_is_independent_of_world_size_and_workers(shakespeare):
    ds = StreamingDataset(str(shakespeare / "train"), seed=3)
    reference = torch.stack([ds[g]["input_ids"] for g in range(8 * 6)])
    for world, workers, micro in [(1, 0, None), (2, 0, 2), (4, 0, 1), (1, 2, 4), (2, 2, 1)]:
        assert torch.equal(_global_stream(ds, 8, 6, world, workers, micro), reference), (world, workers)


def test_shuffle_covers_every_sample_once_per_epoch_and_epochs_differ(shakespeare):
    ds = StreamingDataset(str(shakespeare / "train"), seed=0, shuffle_block=2)
    n = len(ds)
    first = [ds.locate(g)[1] for g in range(n)]
    second = [ds.locate(g)[1] for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    other_seed = StreamingDataset(str(shakespeare / "train"), seed=1)
    assert [other_seed.locate(g)[1] for g in range(50)] != first[:50]


def test_resume_mid_epoch_equals_the_uninterrupted_stream_on_any_world_size(shakespeare):
    ds = StreamingDataset(str(shakespeare / "train"), seed=5)
    straight = StreamLoader(ds, global_batch=8, micro_batch=4, stop=8 * 10)
    expected = list(straight)
    first = StreamLoader(ds, global_batch=8, micro_batch=4)
    it = iter(first)
    head = [next(it) for _ in range(8)]  # 4 global steps
    state = first.state_dict()
    assert state["consumed"] == 32
    resumed = StreamLoader(StreamingDataset(str(shakespeare / "train"), seed=5), 8, 4, stop=80)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(head + list(resumed), expected))
    # the same checkpoint resumed on 2 ranks: their slices interleave back to the same stream
    two = [StreamLoader(ds, 8, 2, rank=r, world_size=2, stop=80) for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    parts = [torch.cat(list(loader)).view(6, 4, -1) for loader in two]
    assert torch.equal(torch.cat(parts, dim=1).reshape(-1, 64), torch.cat(expected[8:]))
    with pytest.raises(UserError, match="training data changed since this checkpoint"):
        StreamLoader(StreamingDataset(str(shakespeare / "train"), seed=6), 8, 4).load_state_dict(state)


def test_resume_lookup_is_constant_time(shakespeare):
    ds = StreamingDataset(str(shakespeare / "train"), seed=5)
    ds.locate(0)
    start = time.perf_counter()
    ds.locate(10**9)  # a billion samples in: computed, not replayed
    assert time.perf_counter() - start < 5.0


def test_mixing_by_proportion_and_by_count(shakespeare, tmp_path, tokenizer_path):
    prepare(
        [str(SHARED / "text" / "tinystories_valid_head.txt")], str(tmp_path / "st"), str(tokenizer_path), seq_len=64
    )
    train_a, train_b = str(shakespeare / "train"), str(tmp_path / "st" / "train")
    ds = StreamingDataset([Source(train_a, proportion=1), Source(train_b, proportion=3)], seed=0)
    n = len(ds)
    sources = Counter(ds.locate(g)[0] for g in range(n))
    assert abs(sources[0] - n / 4) <= 1 and sources[0] + sources[1] == n  # exact per epoch
    prefix = Counter(ds.locate(g)[0] for g in range(2000))
    assert 0.21 < prefix[0] / 2000 < 0.29  # and well mixed along the way
    fixed = StreamingDataset([Source(train_a, samples_per_epoch=100), Source(train_b, samples_per_epoch=7000)])
    picks = [fixed.locate(g) for g in range(len(fixed))]
    assert Counter(s for s, _ in picks) == {0: 100, 1: 7000}
    b_samples = [i for s, i in picks if s == 1]
    size_b = fixed.data[1].size
    assert size_b < 7000 and len(set(b_samples)) == size_b  # repeated past its size: every sample used
    with pytest.raises(UserError, match="samples_per_epoch for every source"):
        StreamingDataset([Source(train_a, samples_per_epoch=5), Source(train_b)])


# ---------------------------------------------------------------------------------------------
# Object storage: a real S3-compatible server (moto) on loopback (the `s3` fixture in conftest.py).


@pytest.fixture(scope="module")
def s3_shakespeare(s3, tokenizer_path) -> str:
    url = "s3://longboi-test/shakespeare"
    prepare([str(SHAKESPEARE)], url, str(tokenizer_path), seq_len=64, val_fraction=0.1, shard_mb=0.05)
    return url


def test_prepare_to_s3_and_stream_with_a_cold_cache(s3_shakespeare, shakespeare, tmp_path):
    url = s3_shakespeare
    cache = CacheConfig(dir=str(tmp_path / "cache"), limit_gb=1.0)
    remote = StreamingDataset(f"{url}/train", seed=2, cache=cache)
    local = StreamingDataset(str(shakespeare / "train"), seed=2)
    assert len(remote) == len(local)
    for g in (0, 1, 17, 500, len(local) - 1, len(local) + 3):
        assert torch.equal(remote[g]["input_ids"], local[g]["input_ids"])
    assert list((tmp_path / "cache").rglob("*.bin"))


READER = """
import os, sys, torch
from longboi.data.stream import CacheConfig, ShardCache, StreamingDataset
real = ShardCache._download
def logged(self, src, path, size, sha256):  # every real download, for the test to count
    # one write(2) per line: print() from two prefetch threads can interleave its pieces
    os.write(2, f"download {path.name}\\n".encode())
    return real(self, src, path, size, sha256)
ShardCache._download = logged
ds = StreamingDataset(sys.argv[1], seed=2, cache=CacheConfig(dir=sys.argv[2], limit_gb=1.0))
total = sum(int(ds[g]["input_ids"].sum()) for g in range(0, len(ds), 7))
print(total)
"""


def test_concurrent_readers_share_one_cache(s3_shakespeare, shakespeare, tmp_path):
    url = "s3://longboi-test/shakespeare/train"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, url, str(tmp_path / "shared-cache")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    local = StreamingDataset(str(shakespeare / "train"), seed=2)
    expected = str(sum(int(local[g]["input_ids"].sum()) for g in range(0, len(local), 7)))
    assert [out.strip() for out, _ in results] == [expected] * 3
    downloads = [line.split()[1] for _, err in results for line in err.splitlines() if line.startswith("download ")]
    source = local.data[0]
    read = {source.index.shards[source.shard_of(local.locate(g)[1])].file for g in range(0, len(local), 7)}
    assert len(downloads) == len(set(downloads))  # no shard fetched twice, across the three processes
    assert read <= set(downloads) <= {sh.file for sh in source.index.shards}  # (prefetch may add a few more)
    assert not [p for p in (tmp_path / "shared-cache").rglob("*") if ".tmp-" in p.name]


def test_cache_size_limit_evicts_old_shards(s3_shakespeare, tmp_path):
    url = "s3://longboi-test/shakespeare/train"
    shard_bytes = 52_428  # shard_mb=0.05
    ds = StreamingDataset(
        url, shuffle=False, cache=CacheConfig(dir=str(tmp_path / "c"), limit_gb=3 * shard_bytes / 2**30)
    )
    for g in range(0, len(ds), 50):
        ds[g]
    if ds._prefetcher is not None:  # let background prefetches finish, then look
        ds._prefetcher.shutdown(wait=True)
    cached = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.bin"))
    assert cached <= 4 * shard_bytes


def test_missing_remote_data_gives_a_clear_error(s3, tmp_path):
    with pytest.raises(UserError, match="dataset index not found: s3://longboi-test/nothing/index.json"):
        StreamingDataset("s3://longboi-test/nothing", cache=CacheConfig(dir=str(tmp_path / "c")))


def test_a_bad_remote_shard_is_retried_then_reported(s3_shakespeare, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.copy("longboi-test/shakespeare/train", "longboi-test/broken/train", recursive=True)
    real = bytearray(fs.cat("longboi-test/broken/train/shard-00000-00000.bin"))
    real[100] ^= 0xFF  # the right size, one wrong byte: only the sha256 can tell
    fs.pipe("longboi-test/broken/train/shard-00000-00000.bin", bytes(real))
    ds = StreamingDataset(
        "s3://longboi-test/broken/train",
        shuffle=False,
        cache=CacheConfig(dir=str(tmp_path / "c"), retries=2, prefetch_shards=0),
    )
    start = time.perf_counter()
    with pytest.raises(
        UserError, match=r"could not download .*shard-00000-00000.bin after 2 attempts.*sha256 does not match"
    ):
        ds[0]
    assert time.perf_counter() - start >= 0.5  # it backed off before the second attempt
    assert not list((tmp_path / "c").rglob("shard-00000-00000.bin"))  # nothing unverified entered the cache


def test_vocabularies_past_65536_ids_get_uint32_shards(tmp_path, tokenizer_path):
    from tokenizers import Tokenizer as HFTokenizer

    big = HFTokenizer.from_file(str(tokenizer_path))
    big.add_tokens([f"<extra_{i}>" for i in range(16_000)])  # 50,277 + 16,000 ids: past uint16
    big.save(str(tmp_path / "big.json"))
    tok = Tokenizer(tmp_path / "big.json")
    assert tok.vocab_size == 66_277
    (tmp_path / "in.txt").write_text(("To be <extra_15999> or not <extra_0> to be. " * 50).strip())
    prepare([str(tmp_path / "in.txt")], str(tmp_path / "out"), str(tmp_path / "big.json"), seq_len=16)
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index["dtype"] == "uint32"
    ds = StreamingDataset(str(tmp_path / "out" / "train"), shuffle=False)
    ids = torch.cat([ds[g]["input_ids"] for g in range(len(ds))]).tolist()
    assert 66_276 in ids and max(ids) == 66_276  # read back unclipped, not wrapped modulo 2^16


@pytest.mark.parametrize("workers", [1, 2])
def test_files_without_a_suffix_as_split_writes_them_are_read(tmp_path, tokenizer_path, workers, capsys):
    """`split -d` leaves part00, part01, ...: read as text (jsonl when the first line is a JSON object),
    in one process and in workers, with the same tokens as the same bytes named .txt; binary files and
    other suffixes in the directory are skipped, and named when nothing is left."""
    text = SHAKESPEARE.read_bytes()[:120_000]
    cut = text.index(b"\n\n", 60_000) + 2  # at a paragraph: the .txt twin splits into the same documents
    parts, named = tmp_path / "parts", tmp_path / "named"
    parts.mkdir(), named.mkdir()
    for i, chunk in enumerate((text[:cut], text[cut:])):
        (parts / f"part{i:02d}").write_bytes(chunk)
        (named / f"part{i:02d}.txt").write_bytes(chunk)
    rows = [{"text": f"Story {i}. " * 40} for i in range(30)]
    (parts / "rows").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (named / "rows.jsonl").write_text((parts / "rows").read_text())
    (parts / "blob").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 100)  # binary: skipped
    (parts / "notes.csv").write_text("a,b\n")  # another suffix: skipped
    (parts / ".hidden").write_text("not read")
    a = prepare([str(parts)], str(tmp_path / "a"), str(tokenizer_path), seq_len=64, workers=workers)
    b = prepare([str(named)], str(tmp_path / "b"), str(tokenizer_path), seq_len=64, workers=workers)
    assert a.files == b.files == 3 and a.documents == b.documents and a.tokens == b.tokens
    assert (tmp_path / "a" / "train" / "shard-00000-00000.bin").read_bytes() == (
        tmp_path / "b" / "train" / "shard-00000-00000.bin"
    ).read_bytes()
    only_others = tmp_path / "others"
    only_others.mkdir()
    (only_others / "blob").write_bytes(b"\x00\x01" * 10)
    (only_others / "notes.csv").write_text("a,b\n")
    assert main(["prepare", str(only_others), "--out", str(tmp_path / "c"), "--tokenizer", str(tokenizer_path)]) == 2
    err = capsys.readouterr().err
    assert "no input files found" in err and "1 x .csv" in err and "1 x binary files without a suffix" in err
    assert "files without a suffix that hold text" in err
