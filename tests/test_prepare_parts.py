"""`prepare --part I/N` + `merge-index`: N parts write byte for byte the dataset one process writes."""

import json
from pathlib import Path

import pytest
from conftest import SHARED

from longboi.cli import main
from longboi.data.parts import part_spec
from longboi.data.prepare import merge, prepare
from longboi.data.stream import StreamingDataset
from longboi.errors import UserError

GROUP_MB = 0.1  # ~100 KiB groups: the 1 MiB of inputs below make about a dozen, the big jsonl several
OPTIONS = dict(seq_len=64, val_fraction=0.05, shard_mb=0.02, on_bad_input="skip", group_mb=GROUP_MB)
BAD_LINES = (40, 3000)  # in the big jsonl: one early, one in a later piece (so in another part)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Several files: the big jsonl (TinyStories, two bad lines) larger than the rest, text with and
    without a suffix."""
    d = tmp_path_factory.mktemp("inputs")
    stories = (SHARED / "text" / "tinystories_valid_head.txt").read_text().split("\n\n")
    lines = [json.dumps({"text": s}) for s in stories if s.strip()]
    for at in BAD_LINES:
        lines[at - 1] = '{"text": "cut off'  # invalid JSON at line `at`
    (d / "big.jsonl").write_text("\n".join(lines) + "\n")
    shakespeare = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    (d / "a.txt").write_text(shakespeare[:90_000])
    (d / "part00").write_text(shakespeare[90_000:150_000])  # as `split` names its output
    (d / "c.md").write_text(shakespeare[150_000:160_000])
    return d


@pytest.fixture(scope="module")
def single(inputs, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    report = prepare([str(inputs)], str(out), str(tokenizer_path), **OPTIONS)
    return out, report


def files_of(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.parts[-2] != "parts"
    }


def run_parts(inputs, out, tokenizer_path, n, only=None, **changes) -> None:
    for i in range(n) if only is None else only:
        prepare([str(inputs)], str(out), str(tokenizer_path), **(OPTIONS | changes), part=(i, n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parts_merged_are_byte_identical_to_one_process(inputs, single, tokenizer_path, tmp_path, n):
    out, report = single
    assert report.skipped == 2 and (out / "val" / "index.json").is_file()
    run_parts(inputs, tmp_path / "out", tokenizer_path, n, workers=n - 1)  # tokenizer processes change nothing
    records = sorted((tmp_path / "out" / "parts").iterdir())
    assert [p.name for p in records] == [f"part-{i:05d}-of-{n:05d}.json" for i in range(n)]
    assert not (tmp_path / "out" / "train" / "index.json").exists()  # not a dataset until merged
    assert main(["merge-index", str(tmp_path / "out")]) == 0
    assert files_of(tmp_path / "out") == files_of(out)  # every shard and both index.json, byte for byte
    groups = [set(json.loads(p.read_text())["groups"]) for p in records]
    assert all(groups) and len(set().union(*groups)) == sum(map(len, groups))  # each part did its own share
    parts = [json.loads(p.read_text())["report"] for p in records]
    assert sum(r["skipped"] for r in parts) == report.skipped == 2  # the bad-input report, summed
    assert sum(r["documents"] for r in parts) == report.documents


def test_merge_sums_the_bad_input_report_and_streams_the_same_samples(inputs, single, tokenizer_path, tmp_path, capsys):
    out, report = single
    run_parts(inputs, tmp_path / "out", tokenizer_path, 2)
    capsys.readouterr()
    main(["merge-index", str(tmp_path / "out")])
    said = capsys.readouterr().out
    assert f"{report.documents} documents" in said and "skipped 2 bad inputs" in said
    for line in BAD_LINES:  # absolute line numbers, also in the piece that starts deep in the file
        assert f"big.jsonl:{line}: invalid JSON" in said
    a, b = StreamingDataset(str(out / "train"), seed=3), StreamingDataset(str(tmp_path / "out" / "train"), seed=3)
    assert len(a) == len(b) and all((a[i]["input_ids"] == b[i]["input_ids"]).all() for i in range(0, len(a), 7))


def test_an_error_in_a_late_piece_names_its_line_in_the_file(inputs, tokenizer_path, tmp_path):
    options = OPTIONS | {"on_bad_input": "error"}
    with pytest.raises(UserError, match=rf"big.jsonl:{BAD_LINES[0]}: invalid JSON"):
        prepare([str(inputs / "big.jsonl")], str(tmp_path / "o"), str(tokenizer_path), **options, part=(0, 3))
    with pytest.raises(UserError, match=rf"big.jsonl:{BAD_LINES[1]}: invalid JSON"):
        prepare([str(inputs / "big.jsonl")], str(tmp_path / "o"), str(tokenizer_path), **options, part=(2, 3))


def test_merge_names_a_missing_part_and_a_crashed_rerun_then_the_rerun_replaces_it(
    inputs, single, tokenizer_path, tmp_path, capsys
):
    out = tmp_path / "out"
    run_parts(inputs, out, tokenizer_path, 3, only=[0, 2])
    assert main(["merge-index", str(out)]) == 2
    assert "part 1 (part-00001-of-00003.json) of 3 not finished" in capsys.readouterr().err
    run_parts(inputs, out, tokenizer_path, 3, only=[1])
    assert main(["merge-index", str(out)]) == 0
    # Part 1 is rerun and crashes half-way: its record goes first, a shard it wrote is cut short.
    record = out / "parts" / "part-00001-of-00003.json"
    mine = json.loads(record.read_text())["groups"]
    shard = out / "train" / next(iter(mine.values()))["train"]["shards"][0]["file"]
    record.unlink()
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["merge-index", str(out)]) == 2
    assert "part 1 (part-00001-of-00003.json) of 3 not finished" in capsys.readouterr().err
    record.write_text(json.dumps(json.loads(record.with_name("part-00000-of-00003.json").read_text()) | {"part": 1}))
    with pytest.raises(UserError, match="group 0 is in the records of parts 0 and 1 of 3"):  # copied by hand
        merge(str(out))
    run_parts(inputs, out, tokenizer_path, 3, only=[1])  # the rerun: same names, same bytes
    assert main(["merge-index", str(out)]) == 0
    assert files_of(out) == files_of(single[0])  # no duplicate or missing sample


def test_merge_refuses_parts_of_different_runs_and_a_truncated_shard(inputs, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "out"
    run_parts(inputs, out, tokenizer_path, 2, only=[0])
    run_parts(inputs, out, tokenizer_path, 2, only=[1], seq_len=32)
    assert main(["merge-index", str(out)]) == 2
    assert "part-00001-of-00002.json is from another run than part 0 (differs in: fingerprint, seq_len)" in (
        capsys.readouterr().err
    )
    run_parts(inputs, out, tokenizer_path, 2, only=[1])
    shard = sorted((out / "train").glob("shard-*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[:-2])
    assert main(["merge-index", str(out)]) == 2
    assert (
        f"{shard.name} ({shard.stat().st_size} bytes, expected {shard.stat().st_size + 2})" in capsys.readouterr().err
    )
    assert main(["merge-index", str(tmp_path / "nothing")]) == 2
    assert "no part records" in capsys.readouterr().err


def test_part_spec_and_group_size_are_checked(inputs, tokenizer_path, tmp_path):
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="group_mb must be a positive number"):
            prepare([str(inputs)], str(tmp_path / "o"), str(tokenizer_path), **(OPTIONS | {"group_mb": bad}))
    assert part_spec("3/4") == (3, 4) and part_spec(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(UserError, match="--part"):
            part_spec(bad)


def test_more_parts_than_groups_and_parts_to_s3(inputs, single, tokenizer_path, tmp_path, s3):
    import s3fs

    url = "s3://longboi-test/parts"
    small = [str(inputs / "c.md")]  # one group: most of 4 parts have nothing to do, and say so in their record
    for i in range(4):
        prepare(small, url, str(tokenizer_path), **(OPTIONS | {"val_fraction": 0}), part=(i, 4))
    assert main(["merge-index", url]) == 0
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    alone = tmp_path / "alone"
    prepare(small, str(alone), str(tokenizer_path), **(OPTIONS | {"val_fraction": 0}))
    assert fs.cat(f"{url[5:]}/train/index.json") == (alone / "train" / "index.json").read_bytes()
    # the whole input, 3 parts to object storage, streamed back: the same samples as one local process
    url = "s3://longboi-test/parts3"
    run_parts(inputs, url, tokenizer_path, 3)
    assert main(["merge-index", url]) == 0
    for split in ("train", "val"):
        local = files_of(single[0])
        for name, data in local.items():
            if name.startswith(split):
                assert fs.cat(f"{url[5:]}/{name}") == data, name


def test_group_tails_join_so_a_small_validation_split_keeps_its_samples(inputs, single, tokenizer_path, tmp_path):
    """Each group's last partial sample is carried to one tails shard: the whole dataset drops under
    seq_len tokens per split, however many groups (here every group's validation tail is under seq_len,
    so without the carry there would be no validation sample at all)."""
    _, report = single
    assert report.dropped_tail_tokens < 2 * OPTIONS["seq_len"]
    small = OPTIONS | {"val_fraction": 0.001}
    one = prepare([str(inputs)], str(tmp_path / "one"), str(tokenizer_path), **small)
    assert one.samples["val"] >= 3 and one.dropped_tail_tokens < 2 * 64
    assert (tmp_path / "one" / "val" / "shard-tails-00000.bin").is_file()
    run_parts(inputs, tmp_path / "two", tokenizer_path, 2, val_fraction=0.001)
    assert main(["merge-index", str(tmp_path / "two")]) == 0
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
