"""The serving engine's decisions, without a model: which sequences compute how many tokens this step,
which wait, which are preempted, and where their keys/values live in a paged KV cache.

The KV cache is a pool of blocks of `block_size` positions; a sequence holds a list of block ids (its
block table), so memory follows the tokens in use, not rows x max length. Block 0 is never handed out:
it stays zero, and the runner pads gathers with it.

Prefix caching: once a block is full, it is registered under its exact content (the previous block's
key and its own tokens), so a later sequence whose prompt starts with the same tokens takes the block
instead of computing it (shared, reference-counted, never copied). A full block is never written
again, so sharing needs no copy-on-write; the one copy is a partial last block when a request's n
choices fork from one prompt. Blocks nobody holds stay registered, least recently used first out,
until a new block is needed and the free list is empty.

Each step (`schedule`) decodes one token for every running sequence and spends up to `step_tokens`
prompt tokens on prefills, in pieces that start at multiples of `prefill_chunk`: a prompt is cut in the
same pieces whatever else runs, so its numbers do not depend on the batch. Running sequences go in
arrival order; when one needs a block and none is free or evictable, the latest arrival is preempted
(its blocks released, its tokens kept: it recomputes them, with prefix hits, when it is admitted
again). Waiting sequences are admitted first come, first served while rows and blocks allow.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

RESERVED = 0  # the zero block


@dataclass(eq=False)
class Seq:
    """One sequence: its tokens (prompt, then what was sampled), how many have keys/values in the
    cache (`computed`), and the blocks holding them. `forks` more rows are kept for the choices that
    will fork from it when its prompt is in (n > 1); `shared` False keeps it out of the prefix cache's
    lookups (it still registers what it computes)."""

    tokens: list[int]
    owner: Any = None  # the runner's object for this sequence
    forks: int = 0
    shared: bool = True
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # prefix-cache key of each registered full block
    order: int = 0  # arrival: lower runs first and is preempted last
    hits: int = 0  # tokens taken from the prefix cache when last admitted
    root: int = 0  # the key its first block hangs under: 0 for the base model, one per adapter stack


@dataclass(frozen=True)
class Piece:
    """Compute tokens [start, start + count) of `seq` this step. `last` is set when the piece ends at
    the sequence's last token: its final position's logits give the next token."""

    seq: Seq
    start: int
    count: int

    @property
    def last(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)

    @property
    def decode(self) -> bool:
        """One token after others already in the cache (batched with the other decodes)."""
        return self.count == 1 and self.start > 0


@dataclass
class Plan:
    """One step: decode pieces (one token each) first, then prefill pieces; sequences preempted while
    planning (already back in the waiting line)."""

    pieces: list[Piece]
    preempted: list[Seq]


class BlockPool:
    """Block ids with reference counts; free ids come out lowest first, so the memory touched stays
    compact; registered blocks nobody holds wait in an LRU for a prefix hit or eviction."""

    def __init__(self, blocks: int):
        self.total = blocks
        self.free = list(range(1, blocks))  # a heap
        self.refs = [0] * blocks
        self.key_of: dict[int, tuple] = {}  # block -> its entry in `table`
        self.table: dict[tuple, tuple[int, int]] = {}  # (parent key, tokens) -> (block, key)
        self.unused: OrderedDict[int, None] = OrderedDict()  # registered, refs 0: oldest first
        self.attached: dict[int, Any] = {}  # key -> what the runner keeps with that content (prompt scores)
        self.serials = itertools.count(1)
        self.hits = self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self.free) + len(self.unused)

    @property
    def held(self) -> int:
        """Blocks holding keys/values: in use or kept for prefix hits."""
        return self.total - 1 - len(self.free)

    def take(self) -> int | None:
        """A fresh block (refs 1), evicting the least recently used cached one if none is free."""
        if self.free:
            block = heapq.heappop(self.free)
        elif self.unused:
            block, _ = self.unused.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            self.unused.pop(block, None)
        self.refs[block] += 1

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self.unused[block] = None  # most recently used last
            else:
                heapq.heappush(self.free, block)

    def register(self, parent: int, tokens: tuple[int, ...], block: int) -> int:
        """Key a full block by its content. If the same content is already cached (two sequences
        computed it at once), the earlier block keeps the key and this one stays private."""
        found = self.table.get((parent, tokens))
        if found is not None:
            return found[1]
        key = next(self.serials)
        self.table[(parent, tokens)] = (block, key)
        self.key_of[block] = (parent, tokens)
        return key

    def new_root(self) -> int:
        """A key no block has: the start of another model's prefixes (an adapter stack's keys/values differ)."""
        return next(self.serials)

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int] | None:
        """The cached (block, key) holding `tokens` after the block keyed `parent` (0: the start)."""
        return self.table.get((parent, tokens))

    def _forget(self, block: int) -> None:
        """An evicted block leaves the table. Blocks keyed under it stay until evicted in turn (their
        parent key is never issued again, so nothing finds them)."""
        _, key = self.table.pop(self.key_of.pop(block))
        self.attached.pop(key, None)


class Scheduler:
    """Decides each step; the runner executes it and reports back (`computed`, `append`, `finish`)."""

    def __init__(
        self, blocks: int, block_size: int = 16, max_rows: int = 64, prefill_chunk: int = 256, step_tokens: int = 1024
    ):
        assert blocks >= 2 and block_size >= 1 and prefill_chunk >= 1
        self.block_size, self.max_rows = block_size, max_rows
        self.prefill_chunk, self.step_tokens = prefill_chunk, max(step_tokens, prefill_chunk)
        self.pool = BlockPool(blocks)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # arrival order
        self.arrivals = itertools.count()
        self.preemptions = 0
        self._preempted: list[Seq] = []  # this step's (a fork outside a step may preempt too)

    # -- what the runner tells it ------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        seq.order = next(self.arrivals)
        self.waiting.append(seq)

    def computed(self, seq: Seq, count: int) -> None:
        """`count` more tokens of `seq` have keys/values in its blocks: register the blocks now full."""
        seq.computed += count
        bs = self.block_size
        for i in range(len(seq.keys), seq.computed // bs):
            parent = seq.keys[-1] if seq.keys else seq.root
            seq.keys.append(self.pool.register(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]), seq.blocks[i]))

    def finish(self, seq: Seq) -> None:
        """The sequence is done (or failed, or cancelled): its blocks go back, its rows too."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fork(self, seq: Seq, n: int) -> tuple[list[Seq], list[tuple[int, int]]] | None:
        """n running copies of `seq` (its prompt just computed): full blocks shared, the partial last
        block copied. Returns the copies and the (source, destination) block copies for the runner, or
        None if the blocks for the copies cannot be had (the caller fails or retries the fork)."""
        partial = seq.computed % self.block_size != 0
        fresh = [self._take_block(seq) for _ in range(n if partial else 0)]
        if any(b is None for b in fresh):
            for b in fresh:
                if b is not None:
                    self.pool.drop(b)
            return None
        copies, forks = [], []
        for i in range(n):
            blocks = seq.blocks[:-1] if partial else list(seq.blocks)
            for b in blocks:
                self.pool.share(b)
            if partial:
                blocks.append(fresh[i])
                copies.append((seq.blocks[-1], fresh[i]))
            state = dict(computed=seq.computed, blocks=blocks, keys=list(seq.keys), order=seq.order, root=seq.root)
            state["shared"] = seq.shared  # a preempted fork recomputes without prefix hits when the job has none
            forks.append(Seq(list(seq.tokens), **state))
        seq.forks = 0
        at = self.running.index(seq) + 1 if seq in self.running else len(self.running)
        self.running[at:at] = forks  # same arrival: they run and are preempted together
        return forks, copies

    def requeue(self, seq: Seq) -> None:
        """Send a running sequence back to wait for room (its blocks released; full ones stay cached)."""
        self._preempt(seq)

    def reset_cache(self) -> None:
        """Forget the prefix cache and start a fresh pool (the engine released its memory; nothing runs)."""
        assert not self.running and not self.waiting, "blocks are in use"
        old, self.pool = self.pool, BlockPool(self.pool.total)
        self.pool.hits, self.pool.evictions = old.hits, old.evictions  # counters run on
        self.pool.serials = old.serials  # keys issued before (adapter roots) must stay unique

    @property
    def rows(self) -> int:
        """Rows taken: running sequences and the forks they will make."""
        return sum(1 + s.forks for s in self.running)

    # -- the decision ------------------------------------------------------------------------------

    def schedule(self) -> Plan:
        budget = self.step_tokens
        decodes: list[Piece] = []
        prefills: list[Piece] = []
        preempted = self._preempted = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted for an earlier arrival this step
                continue
            count = self._piece(seq, budget, prefilled=bool(prefills))
            if count == 0:
                continue
            if not self._grow(seq, seq.computed + count):
                continue  # it was preempted itself
            piece = Piece(seq, seq.computed, count)
            if piece.decode:
                decodes.append(piece)
            else:
                prefills.append(piece)
                budget -= count
        self._admit(budget, prefills)
        return Plan(decodes + prefills, preempted)

    def _piece(self, seq: Seq, budget: int, prefilled: bool) -> int:
        """Tokens of `seq` to compute this step: 1 when decoding; else its next prefill piece (up to
        the next multiple of prefill_chunk), if the step's budget has room or nothing prefills yet."""
        left = len(seq.tokens) - seq.computed
        if left <= 0:
            return 0
        if left == 1 and seq.computed > 0:
            return 1
        end = min(len(seq.tokens), (seq.computed // self.prefill_chunk + 1) * self.prefill_chunk)
        count = end - seq.computed
        return count if count <= budget or not prefilled else 0

    def _grow(self, seq: Seq, positions: int) -> bool:
        """Give `seq` blocks for `positions` positions, preempting later arrivals if none are left.
        False if `seq` itself had to be preempted."""
        while len(seq.blocks) * self.block_size < positions:
            block = self._take_block(seq)
            if block is None:
                self._preempt(seq)
                return False
            seq.blocks.append(block)
        return True

    def _take_block(self, seq: Seq) -> int | None:
        """A block for `seq`: free, evicted from the prefix cache, or freed by preempting a later arrival."""
        while True:
            block = self.pool.take()
            if block is not None:
                return block
            later = self.running[self.running.index(seq) + 1 :] if seq in self.running else self.running
            if not later:
                return None
            self._preempt(later[-1])

    def _preempt(self, seq: Seq) -> None:
        """Back to the front of the waiting line (by arrival), its blocks released, its tokens kept."""
        self._release(seq)
        self.running.remove(seq)
        at = next((i for i, w in enumerate(self.waiting) if w.order > seq.order), len(self.waiting))
        self.waiting.insert(at, seq)
        self.preemptions += 1
        self._preempted.append(seq)

    def _release(self, seq: Seq) -> None:
        for block in seq.blocks:
            self.pool.drop(block)
        seq.blocks, seq.keys, seq.computed = [], [], 0

    def _admit(self, budget: int, prefills: list[Piece]) -> None:
        """Admit waiting sequences in arrival order while rows, blocks and the step's budget allow. A prompt
        that ends this step counts the blocks its n choices will copy when they fork (kept free for them)."""
        reserved = 0
        while self.waiting:
            seq = self.waiting[0]
            if self.rows + 1 + seq.forks > self.max_rows:
                return
            self._lookup(seq)
            if self._in_flight(seq):  # a running sequence is computing its next block: take it next step
                self._release(seq)
                return
            count = self._piece(seq, budget, prefilled=bool(prefills))
            need = -(-(seq.computed + count) // self.block_size) - len(seq.blocks)
            ends = seq.computed + count == len(seq.tokens)
            copies = seq.forks if ends and len(seq.tokens) % self.block_size else 0
            if count == 0 or need + copies + reserved > self.pool.available:
                self._release(seq)  # the hits go back (they stay cached)
                return
            for _ in range(need):
                seq.blocks.append(self.pool.take())
            self.pool.hits += seq.computed
            self.waiting.popleft()
            self.running.insert(sum(1 for s in self.running if s.order < seq.order), seq)  # arrival order
            prefills.append(Piece(seq, seq.computed, count))
            budget -= count
            reserved += copies

    def _in_flight(self, seq: Seq) -> bool:
        """Whether a running sequence is computing the block `seq` would take from the cache next (the same
        tokens after the same prefix): the n choices of a lm-eval question, or requests sent together with
        one system prompt, compute it once instead of each its own."""
        bs, i = self.block_size, len(seq.blocks)
        if not seq.shared or (i + 1) * bs > len(seq.tokens) - 1:  # its next block would not be a hit anyway
            return False
        parent, want = seq.keys[-1] if seq.keys else seq.root, seq.tokens[i * bs : (i + 1) * bs]
        return any(
            len(r.keys) == i
            and (r.keys[-1] if r.keys else r.root) == parent
            and len(r.tokens) >= (i + 1) * bs
            and r.tokens[i * bs : (i + 1) * bs] == want
            for r in self.running
        )

    def _lookup(self, seq: Seq) -> None:
        """Take the cached blocks that hold a prefix of `seq`'s tokens (all but its last token at most:
        that one is computed for its logits)."""
        bs = self.block_size
        parent = seq.root
        if seq.shared:
            for i in range((len(seq.tokens) - 1) // bs):
                found = self.pool.lookup(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))
                if found is None:
                    break
                block, parent = found
                self.pool.share(block)
                seq.blocks.append(block)
                seq.keys.append(parent)
        seq.computed = seq.hits = len(seq.blocks) * bs
