"""Streaming dataset: deterministic global sample order, O(1) resume, mixing, local or remote shards.

The global order is a pure function of (seed, global sample index g):

    g -> epoch e = g // N, position p = g % N            (N = samples per epoch, all sources)
      -> source s: the epoch's mixing plan, in windows of WINDOW positions whose per-source counts
         are drawn once per epoch (multivariate hypergeometric, so an epoch holds exactly n_s
         samples of source s) and shuffled within the window
      -> the k-th draw from s (k = e * n_s + draws of s before p in epoch e)
      -> pass r = k // size_s over s, sample = perm(seed, s, r)[k % size_s], where perm shuffles
         the shard order, then the samples within blocks of `shuffle_block` shards (so a reader
         needs only a few shards at a time: locality for remote storage).

Nothing depends on the number of ranks or loader workers: `StreamLoader` gives rank r of W the
r-th slice of every global batch, and resuming means starting at the next global index (no replay).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longboi.data.shards import DatasetIndex, ShardInfo, ShardReader, sha256_file
from longboi.errors import UserError

WINDOW = 1 << 16  # mixing-plan window (global positions)
OPEN_SHARDS = 16  # readers kept open per source


@dataclass(frozen=True)
class Source:
    """One prepared split (a directory or URL holding index.json) and its share of each epoch.

    Give `proportion` (relative weights, normalized over sources) or `samples_per_epoch` (exact
    counts) for every source, or neither (each source contributes its size: plain concatenation).
    A source asked for more samples than it has is repeated, reshuffled on each pass.
    """

    path: str
    proportion: float | None = None
    samples_per_epoch: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    """Where remote shards are kept and how much disk they may use."""

    dir: str = "~/.cache/longboi/shards"
    limit_gb: float = 50.0
    prefetch_shards: int = 4
    retries: int = 5


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class ShardCache:
    """Local copies of remote shards, shared safely by every process on the machine.

    A download goes to a temp file, is verified (size + sha256), then renamed into place under a
    per-file lock, so concurrent ranks never read a partial file and never download twice. When the
    cache grows past its limit the least recently used shards are deleted (a reader that still has
    one memory-mapped keeps working: the data lives until it is unmapped).
    """

    def __init__(self, cfg: CacheConfig):
        self.cfg = cfg
        self.root = Path(os.path.expanduser(cfg.dir))
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, url: str, name: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:16] / name

    def fetch(self, url: str, name: str, size: int, sha256: str | None) -> Path:
        path = self.local_path(url, name)
        if path.is_file() and path.stat().st_size == size:
            os.utime(path)  # LRU by mtime
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per file across processes
            if not (path.is_file() and path.stat().st_size == size):
                self._download(f"{url}/{name}", path, size, sha256)
        self._evict(keep=path)
        return path

    def _download(self, src: str, path: Path, size: int, sha256: str | None) -> None:
        import fsspec

        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        for attempt in range(self.cfg.retries):
            try:
                with fsspec.open(src, "rb") as remote, open(tmp, "wb") as local:
                    while block := remote.read(1 << 22):
                        local.write(block)
                got = tmp.stat().st_size
                if got != size:
                    raise OSError(f"downloaded {src}: {got} bytes, index.json says {size}")
                if sha256 is not None and sha256_file(tmp) != sha256:
                    raise OSError(f"downloaded {src}: its sha256 does not match index.json")
                os.replace(tmp, path)
                return
            except (OSError, TimeoutError) as e:  # transient network errors: back off and retry
                tmp.unlink(missing_ok=True)
                if attempt == self.cfg.retries - 1:
                    raise UserError(f"could not download {src} after {self.cfg.retries} attempts: {e}") from e
                time.sleep(min(30.0, 0.5 * 2**attempt))

    def _evict(self, keep: Path) -> None:
        limit = self.cfg.limit_gb * 2**30
        files = []  # (mtime, size, path); another thread or process may evict at the same time
        for p in self.root.rglob("*"):
            if p.suffix in (".bin", ".idx"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= limit:
                break
            if p != keep:
                total -= size
                p.unlink(missing_ok=True)


class _SourceData:
    """One source's index, shard readers (opened and verified lazily) and per-pass permutations."""

    def __init__(self, source: Source, cache: ShardCache | None, verify: bool):
        self.source, self.cache, self.verify = source, cache, verify
        self.url = source.path.rstrip("/")
        self.remote = _is_remote(self.url)
        self.index = self._read_index()
        self.size = self.index.total_samples
        self.shard_starts = np.cumsum([0] + [s.samples for s in self.index.shards])
        self.readers: OrderedDict[int, ShardReader] = OrderedDict()
        self.perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def _read_index(self) -> DatasetIndex:
        where = f"{self.url}/index.json"
        if self.remote:
            import fsspec

            try:
                with fsspec.open(where, "r") as f:
                    text = f.read()
            except FileNotFoundError as e:
                raise UserError(f"dataset index not found: {where}") from e
        else:
            path = Path(self.url.removeprefix("file://")) / "index.json"
            if not path.is_file():
                raise UserError(f"dataset index not found: {path} (run `longboi prepare`)")
            text = path.read_text()
        index = DatasetIndex.from_json(text, where)
        if index.total_samples == 0:
            raise UserError(f"{where}: dataset has no samples")
        return index

    def local_file(self, shard: ShardInfo) -> Path:
        if not self.remote:
            return Path(self.url.removeprefix("file://")) / shard.file
        assert self.cache is not None
        if shard.offsets_file:
            self.cache.fetch(self.url, shard.offsets_file, 8 * (shard.samples + 1), shard.offsets_sha256)
        return self.cache.fetch(self.url, shard.file, shard.bytes, shard.sha256)

    def reader(self, shard_id: int) -> ShardReader:
        with self.lock:
            if shard_id in self.readers:
                self.readers.move_to_end(shard_id)
                return self.readers[shard_id]
        shard = self.index.shards[shard_id]
        # Remote files were verified when downloaded; local ones are verified on first open.
        reader = ShardReader(self.index, shard, self.local_file(shard), verify=self.verify and not self.remote)
        with self.lock:
            self.readers[shard_id] = reader
            while len(self.readers) > OPEN_SHARDS:
                self.readers.popitem(last=False)
        return reader

    def shard_of(self, sample: int) -> int:
        return int(np.searchsorted(self.shard_starts, sample, side="right") - 1)

    def get(self, sample: int) -> np.ndarray:
        shard = self.shard_of(sample)
        return self.reader(shard)[sample - int(self.shard_starts[shard])]

    def permutation(self, seed: int, source_id: int, pass_id: int, shuffle: bool, block: int) -> np.ndarray:
        """Sample order of one pass: shards shuffled, then samples shuffled within blocks of shards."""
        with self.lock:
            if pass_id in self.perms:
                return self.perms[pass_id]
        if not shuffle:
            perm = np.arange(self.size)
        else:
            rng = _rng(seed, source_id, pass_id)
            order = rng.permutation(len(self.index.shards))
            parts = []
            for start in range(0, len(order), block):
                ids = np.concatenate(
                    [np.arange(self.shard_starts[s], self.shard_starts[s + 1]) for s in order[start : start + block]]
                )
                parts.append(rng.permutation(ids))
            perm = np.concatenate(parts)
        with self.lock:
            self.perms[pass_id] = perm
            while len(self.perms) > 2:
                self.perms.popitem(last=False)
        return perm


class StreamingDataset(torch.utils.data.Dataset):
    """Map-style view of an endless, deterministic sample stream: `ds[g]` is global sample g.

    Index g may exceed `len(ds)` (one epoch): later epochs reshuffle. Returns the sample's token
    ids (int64 tensor) and which source it came from.
    """

    def __init__(
        self,
        sources: list[Source] | str,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_block: int = 4,
        cache: CacheConfig | None = None,
        verify: bool = True,
    ):
        if isinstance(sources, str):
            sources = [Source(sources)]
        if not sources:
            raise UserError("no data sources given")
        self.seed, self.shuffle, self.shuffle_block = seed, shuffle, max(1, shuffle_block)
        needs_cache = any(_is_remote(s.path) for s in sources)
        self.cache = ShardCache(cache or CacheConfig()) if needs_cache else None
        self.data = [_SourceData(s, self.cache, verify) for s in sources]
        self._check_compatible()
        self.counts = self._epoch_counts(sources)
        self.epoch_samples = int(self.counts.sum())
        self.plans: OrderedDict[int, np.ndarray] = OrderedDict()
        self.window_plans: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetched: set[tuple[int, int]] = set()

    def fingerprint(self) -> str:
        """Identity of the stream: each source's shards (content hashes) and share, the seed and the
        shuffle. A checkpoint records it; resuming with different data is refused."""
        sources = [
            [d.index.tokenizer_sha256, [sh.sha256 for sh in d.index.shards], d.source.proportion,
             d.source.samples_per_epoch]
            for d in self.data
        ]  # fmt: skip
        blob = json.dumps([sources, self.seed, self.shuffle, self.shuffle_block])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return ", ".join(d.url for d in self.data)

    def _check_compatible(self) -> None:
        first = self.data[0].index
        for d in self.data[1:]:
            if (d.index.tokenizer_sha256, d.index.layout) != (first.tokenizer_sha256, first.layout):
                raise UserError(
                    f"{d.url}: tokenizer or layout differs from {self.data[0].url}; "
                    "all sources must be prepared with the same tokenizer and layout"
                )
            if first.layout == "chunks" and d.index.seq_len != first.seq_len:
                raise UserError(f"{d.url}: seq_len {d.index.seq_len} differs from {self.data[0].url} ({first.seq_len})")

    def _epoch_counts(self, sources: list[Source]) -> np.ndarray:
        sizes = np.array([d.size for d in self.data], dtype=np.int64)
        fixed = [s.samples_per_epoch for s in sources]
        props = [s.proportion for s in sources]
        if any(f is not None for f in fixed):
            if any(f is None for f in fixed) or any(p is not None for p in props):
                raise UserError("give samples_per_epoch for every source, and no proportions, or use proportions")
            counts = np.array(fixed, dtype=np.int64)
        elif any(p is not None for p in props):
            if any(p is None or p <= 0 for p in props):
                raise UserError("every source needs a positive proportion when one has a proportion")
            weights = np.array(props, dtype=np.float64) / sum(props)  # type: ignore[arg-type]
            counts = _largest_remainder(weights, int(sizes.sum()))
        else:
            counts = sizes
        if (counts <= 0).any():
            raise UserError(f"every source needs at least one sample per epoch, got {counts.tolist()}")
        return counts

    @property
    def seq_len(self) -> int:
        return self.data[0].index.seq_len

    def __len__(self) -> int:
        return self.epoch_samples

    # -- the global order ----------------------------------------------------------------------

    def _window_counts(self, epoch: int) -> np.ndarray:
        """(windows + 1, S) cumulative per-source counts at each window start of this epoch."""
        with self.data[0].lock:
            if epoch in self.plans:
                return self.plans[epoch]
        rng = _rng(self.seed, 1_000_003, epoch)
        remaining = self.counts.copy()
        cum = [np.zeros_like(remaining)]
        for start in range(0, self.epoch_samples, WINDOW):
            n = min(WINDOW, self.epoch_samples - start)
            draw = rng.multivariate_hypergeometric(remaining, n) if len(remaining) > 1 else np.array([n])
            remaining = remaining - draw
            cum.append(cum[-1] + draw)
        table = np.stack(cum)
        with self.data[0].lock:
            self.plans[epoch] = table
            while len(self.plans) > 2:
                self.plans.popitem(last=False)
        return table

    def _window_plan(self, epoch: int, window: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(WINDOW,) source of each position in the window and, per position, how many earlier positions
        of the window drew the same source. Built once per window and kept for the few windows in use:
        building it (a 65k-element shuffle) per sample made `locate` cost about a millisecond."""
        key = (epoch, window)
        with self.data[0].lock:
            if key in self.window_plans:
                self.window_plans.move_to_end(key)
                return self.window_plans[key]
        counts = table[window + 1] - table[window]
        plan = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        _rng(self.seed, 2_000_003, epoch, window).shuffle(plan)
        within = np.empty(len(plan), dtype=np.int64)
        for source in range(len(counts)):
            at = np.flatnonzero(plan == source)
            within[at] = np.arange(len(at))
        with self.data[0].lock:
            self.window_plans[key] = (plan, within)
            while len(self.window_plans) > 4:  # the current window, the next (prefetch) and a little slack
                self.window_plans.popitem(last=False)
        return plan, within

    def locate(self, g: int) -> tuple[int, int]:
        """Global index -> (source id, sample id within that source). Pure function of (seed, g)."""
        if g < 0:
            raise IndexError(g)
        epoch, pos = divmod(g, self.epoch_samples)
        window, offset = divmod(pos, WINDOW)
        table = self._window_counts(epoch)
        plan, within = self._window_plan(epoch, window, table)
        source = int(plan[offset])
        k = int(epoch * self.counts[source] + table[window, source] + within[offset])
        data = self.data[source]
        pass_id, idx = divmod(k, data.size)
        return source, int(data.permutation(self.seed, source, pass_id, self.shuffle, self.shuffle_block)[idx])

    def __getitem__(self, g: int) -> dict[str, torch.Tensor | int]:
        source, sample = self.locate(int(g))
        if self.cache is not None:
            self._prefetch_after(int(g))
        tokens = self.data[source].get(sample)
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "source": source}

    def _prefetch_after(self, g: int) -> None:
        """Start downloading the shards the next samples will need, in the background."""
        assert self.cache is not None
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="longboi-prefetch")
        lookahead = self.cache.cfg.prefetch_shards * max(1, self.data[0].index.shards[0].samples)
        for ahead in range(g + 1, g + lookahead, max(1, lookahead // 32)):
            source, sample = self.locate(ahead)
            key = (source, self.data[source].shard_of(sample))
            if key not in self._prefetched:
                self._prefetched.add(key)
                shard = self.data[source].index.shards[key[1]]
                self._prefetcher.submit(self.data[source].local_file, shard)

    def __getstate__(self) -> dict:  # DataLoader workers: threads and locks are per process
        state = self.__dict__.copy()
        state["_prefetcher"], state["_prefetched"] = None, set()
        return state


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    raw = weights * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts


class RankSampler(torch.utils.data.Sampler[int]):
    """Global indices for one rank: its contiguous slice of each global batch, from `start` on."""

    def __init__(self, global_batch: int, rank: int, world_size: int, start: int = 0, stop: int | None = None):
        if global_batch % world_size:
            raise UserError(f"global batch size {global_batch} is not divisible by world size {world_size}")
        if start % global_batch:
            raise ValueError(f"resume position {start} is not at a global batch boundary ({global_batch})")
        self.global_batch, self.rank, self.world = global_batch, rank, world_size
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        per_rank = self.global_batch // self.world
        batch = self.start // self.global_batch
        while self.stop is None or batch * self.global_batch < self.stop:
            base = batch * self.global_batch + self.rank * per_rank
            yield from range(base, base + per_rank)
            batch += 1


class StreamLoader:
    """Micro-batches for this rank, and an exact, world-size-free position for checkpoints.

    Each global step this rank yields `global_batch / world_size` samples as micro-batches of
    `micro_batch` rows. `state_dict()` counts global samples whose micro-batches were all handed
    out, so saving after an optimizer step and loading (on any world size) resumes at the next step.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        stop: int | None = None,
    ):
        per_rank = global_batch // world_size
        if per_rank % micro_batch:
            raise UserError(
                f"per-rank batch {per_rank} (global {global_batch} / world {world_size}) is not "
                f"divisible by micro_batch {micro_batch}"
            )
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.rank, self.world, self.num_workers, self.stop = rank, world_size, num_workers, stop
        self.accum_steps = per_rank // micro_batch
        self.consumed = 0  # global samples fully handed out
        self._fingerprint: str | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        sampler = RankSampler(self.global_batch, self.rank, self.world, self.consumed, self.stop)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_stack,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            # Its own generator: a DataLoader otherwise draws its base seed from the global RNG,
            # shifting the dropout masks of a resumed run.
            generator=torch.Generator().manual_seed(self.dataset.seed),
        )
        for i, batch in enumerate(loader, start=1):
            if i % self.accum_steps == 0:
                self.consumed += self.global_batch
            yield batch

    def state_dict(self) -> dict:
        """The stream position, and what identifies the stream (checked on load)."""
        if self._fingerprint is None:
            self._fingerprint = self.dataset.fingerprint()
        return {
            "consumed": self.consumed,
            "seed": self.dataset.seed,
            "epoch_samples": self.dataset.epoch_samples,
            "fingerprint": self._fingerprint,
            "sources": self.dataset.describe(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position, only if it is the same stream (same data, shares and seed)."""
        now = self.state_dict()
        if any(state.get(k, now[k]) != now[k] for k in ("seed", "epoch_samples", "fingerprint")):
            raise UserError(
                "the training data changed since this checkpoint (sources, their contents or shares, or the "
                f"seed): it was {state.get('sources', '?')} (seed {state['seed']}, {state['epoch_samples']} "
                f"samples/epoch, fingerprint {state.get('fingerprint', '?')}), now {now['sources']} (seed "
                f"{now['seed']}, {now['epoch_samples']} samples/epoch, fingerprint {now['fingerprint']}), so "
                "resuming would not continue the same stream"
            )
        self.consumed = int(state["consumed"])


def _stack(items: list[dict]) -> torch.Tensor | dict[str, torch.Tensor]:
    if "labels" in items[0]:  # finetuning rows: input_ids, labels, sequence_id
        return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "sequence_id")}
    lengths = {len(it["input_ids"]) for it in items}
    if len(lengths) != 1:
        raise UserError("variable-length samples (documents layout) need packing; prepare with layout chunks")
    return torch.stack([it["input_ids"] for it in items])
