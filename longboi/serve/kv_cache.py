"""The serving engine's paged KV cache (vLLM's paged attention, in plain PyTorch): keys/values in fixed-size
blocks shared by every sequence the engine runs, each sequence attending to its own blocks through its block
table. It implements the model's `Cache` interface (`positions`, `attend`, `advance`), so the model knows
nothing of pages; the scheduler (longboi.serve.scheduler) decides which blocks a sequence holds."""

from __future__ import annotations

import torch

from longboi.model import AttentionMask


class PagedCache:
    """Keys/values in fixed-size blocks shared by every sequence a serving engine runs (vLLM's paged
    attention, in plain PyTorch): pools of (L, Hkv, slots, D), slot = block * block_size + offset.

    The engine lays one step out as one (1, N) row of tokens: decode tokens first (one per sequence),
    then prefill pieces. `plan` gives, per sequence, its first position, its token count and its block
    table; the forward writes each token's keys/values at its slot and each sequence attends to its own
    positions only (gathered through its block table), so batching changes which rows a matmul sees but
    not what any row attends to. Block 0 is kept zero: gathers pad with it, under a -inf bias.

    The pools grow (doubling, up to `blocks`) as blocks are handed out lowest first, so memory follows the
    tokens in use; `release` frees them when the engine idles.
    """

    def __init__(self, n_layers: int, blocks: int, block_size: int):
        self.n_layers, self.blocks, self.block_size = n_layers, blocks, block_size
        self.keys: torch.Tensor | None = None  # (L, Hkv, capacity * block_size, D): head-major, see attend
        self.values: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None  # (capacity * block_size, d): final hidden states, for scoring
        self._gathered: list[torch.Tensor] = []  # reused gather buffers (keys, values), see _gather
        self.step_positions = torch.zeros(0, dtype=torch.long)  # (N,) this step's token positions
        self.length = 0  # no positions shared by every row: each sequence has its own (`positions`)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2] // self.block_size

    def plan(
        self,
        segments: list[tuple[int, int, list[int]]],
        decodes: int,
        slopes: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        """This step: (start, count, block table) per sequence, the first `decodes` of them one token
        each. Builds the write slots, the decode gathers with their bias, and each prefill's mask, on
        `device` (slopes too), once for all layers."""
        gathers = [self._slots(blocks, torch.arange(start + count)) for start, count, blocks in segments]
        self.step_positions = torch.cat([torch.arange(start, start + count) for start, count, _ in segments]).to(device)
        self.slots = torch.cat([g[start:] for g, (start, _, _) in zip(gathers, segments)]).to(device)
        self.needed = max(max(blocks) for _, _, blocks in segments) + 1
        self.decodes = decodes
        self.segments = [(start, count, g.to(device)) for g, (start, count, _) in zip(gathers, segments)]
        self.decode_groups = []  # (rows, (Bg, Tg) slots, (Bg, H|1, 1, Tg) bias) per group of decode rows
        groups = _length_groups([start + 1 for start, _, _ in segments[:decodes]])
        if len(groups) == 1:
            groups = [list(range(decodes))]  # planned in row order: nothing to reorder at run time
        for rows in groups:
            slots, bias = self._decode_plan([segments[r] for r in rows], [gathers[r] for r in rows], slopes)
            self.decode_groups.append((torch.tensor(rows, device=device), slots.to(device), bias.to(device)))
        self.masks = [AttentionMask(count, start + count, slopes, device) for start, count, _ in segments[decodes:]]

    def _slots(self, blocks: list[int], positions: torch.Tensor) -> torch.Tensor:
        """The pool slots of these positions of the sequence whose block table is `blocks`."""
        table = torch.tensor(blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _decode_plan(self, segments, gathers: list[torch.Tensor], slopes: torch.Tensor | None):
        """(B, Tmax) slots of a group of decode rows' keys, padded with the zero block, and the (B, H|1, 1,
        Tmax) fp32 bias: relative ALiBi up to the row's own position, -inf past it."""
        longest = max(start + 1 for start, _, _ in segments)
        slots = torch.zeros(len(segments), longest, dtype=torch.long)
        for row, g in enumerate(gathers):
            slots[row, : len(g)] = g
        q_pos = torch.tensor([start for start, _, _ in segments])[:, None]  # (B, 1)
        key_pos = torch.arange(longest)
        if slopes is None:
            rel = torch.zeros(len(segments), 1, 1, longest)
        else:
            rel = -slopes.cpu()[None, :, None, None] * (q_pos[:, None, :, None] - key_pos).float()  # (B, H, 1, Tmax)
        return slots, rel.masked_fill((key_pos > q_pos)[:, None, None, :], float("-inf"))

    def _ensure(self, like: torch.Tensor) -> None:
        """Pools big enough for this step's blocks (like: (1, Hkv, N, D) keys for dtype and layout)."""
        if self.capacity < self.needed:
            _, h, _, d = like.shape
            self._grow(self.needed, like, h, d)

    def _grow(self, needed: int, like: torch.Tensor, h: int, d: int) -> None:
        capacity = min(self.blocks, max(needed, 2 * self.capacity, 64))
        keys = like.new_empty(self.n_layers, h, capacity * self.block_size, d)  # pages touched as written
        values = like.new_empty(self.n_layers, h, capacity * self.block_size, d)
        keys[:, :, : self.block_size].zero_()  # the zero block
        values[:, :, : self.block_size].zero_()
        if self.keys is not None and self.values is not None:
            keys[:, :, : self.keys.shape[2]] = self.keys
            values[:, :, : self.values.shape[2]] = self.values
        self.keys, self.values = keys, values
        if self.hidden is not None:  # grown with them once it exists (store_hidden makes it)
            hidden = self.hidden.new_empty(capacity * self.block_size, self.hidden.shape[1])
            hidden[: len(self.hidden)] = self.hidden
            self.hidden = hidden

    def store_hidden(self, h: torch.Tensor) -> None:
        """Keep this step's (N, d) final hidden states at their slots: a later request that takes these
        positions from the prefix cache and scores its prompt (echo) computes their logits from them."""
        assert self.keys is not None
        size = self.keys.shape[2]
        if self.hidden is None or len(self.hidden) != size or self.hidden.dtype != h.dtype:
            self.hidden = h.new_zeros(size, h.shape[-1])
        self.hidden.index_copy_(0, self.slots, h)

    def stored_hidden(self, blocks: list[int], positions: list[int]) -> torch.Tensor:
        """(len(positions), d) hidden states kept at these positions of the sequence in `blocks`."""
        assert self.hidden is not None
        return self.hidden[self._slots(blocks, torch.tensor(positions, dtype=torch.long)).to(self.hidden.device)]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys/values (a partial block when a request's choices fork)."""
        if self.keys is None or self.values is None:
            return
        if dst >= self.capacity:
            self._grow(dst + 1, self.keys, self.keys.shape[1], self.keys.shape[3])
        bs = self.block_size
        self.keys[:, :, dst * bs : (dst + 1) * bs] = self.keys[:, :, src * bs : (src + 1) * bs]
        self.values[:, :, dst * bs : (dst + 1) * bs] = self.values[:, :, src * bs : (src + 1) * bs]

    def release(self) -> None:
        self.keys = self.values = self.hidden = None
        self._gathered = []

    def positions(self, count: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Each token's position in its own sequence (planned by `plan`)."""
        return self.step_positions

    def advance(self, n: int) -> None:
        """Nothing to do: the engine tracks each sequence's length."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention, mask, scale: float):
        """Store (1, Hkv, N, D) keys/values at their slots; (1, H, N, D) queries -> (1, H, N, D) outputs.
        `attention(q, k, v, mask)` is the model's path choice for one prefill piece. The pools are
        head-major, so a gather along the slots gives (Hkv, rows x T, D): the decode matmuls batch over
        (Hkv, rows) with no second copy."""
        if layer == 0:
            self._ensure(k)
        assert self.keys is not None and self.values is not None
        keys, values = self.keys[layer], self.values[layer]  # (Hkv, slots, D)
        keys.index_copy_(1, self.slots, k[0].to(keys.dtype))
        values.index_copy_(1, self.slots, v[0].to(values.dtype))
        out = [self._decode(q, keys, values, scale)] if self.decodes else []
        offset = self.decodes
        for (start, count, slots), mask in zip(self.segments[self.decodes :], self.masks):
            qs = q[:, :, offset : offset + count]
            if start == 0:  # nothing cached before it: this forward's own keys, the fresh-prompt path
                ks, vs = k[:, :, offset : offset + count], v[:, :, offset : offset + count]
            else:
                ks, vs = self._gather(keys, values, slots)  # (Hkv, T, D) each
                ks, vs = ks[None], vs[None]
            out.append(attention(qs, ks, vs, mask))
            offset += count
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _gather(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        """(Hkv, n, D) keys and values at `slots`, into buffers kept from call to call: a fresh tensor of
        tens of MB per layer costs more in page faults than the copy itself (15 ms vs 1.2 ms for 64 rows of
        80 positions of mpt-125m on a 2-core Xeon)."""
        h, _, d = keys.shape
        n = h * len(slots) * d
        if not self._gathered or self._gathered[0].numel() < n or self._gathered[0].dtype != keys.dtype:
            self._gathered = [keys.new_empty(n), keys.new_empty(n)]
        k = torch.index_select(keys, 1, slots, out=self._gathered[0][:n].view(h, len(slots), d))
        v = torch.index_select(values, 1, slots, out=self._gathered[1][:n].view(h, len(slots), d))
        return k, v

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """The decode rows (the first `decodes` queries): (1, H, B, D), one batched attention per group of
        rows of similar length (`_length_groups`)."""
        if len(self.decode_groups) == 1:  # planned in row order
            _, slots, bias = self.decode_groups[0]
            return self._decode_group(q[0, :, : self.decodes], keys, values, slots, bias, scale)[None]
        out = q.new_empty(q.shape[1], self.decodes, q.shape[3])
        for rows, slots, bias in self.decode_groups:
            out[:, rows] = self._decode_group(q[0].index_select(1, rows), keys, values, slots, bias, scale)
        return out[None]

    def _decode_group(self, q, keys, values, slots: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """(H, B, D) queries of B decode rows -> (H, B, D): decode_attention's math over their gathered keys,
        with query heads grouped under their key/value head for GQA/MQA."""
        Hkv, _, D = keys.shape
        B, T = slots.shape
        H = q.shape[0]
        kd, vd = self._gather(keys, values, slots.flatten())
        kd, vd = kd.view(Hkv, B, T, D), vd.view(Hkv, B, T, D)
        qd = q.reshape(Hkv, H // Hkv, B, D).transpose(1, 2)  # (Hkv, B, G, D)
        scores = torch.matmul(qd, kd.transpose(-1, -2)).float() * scale  # (Hkv, B, G, T)
        bias = bias.view(B, Hkv, H // Hkv, T) if bias.shape[1] > 1 else bias  # (B, H|1, 1, T) -> (B, Hkv|1, G|1, T)
        probs = (scores + bias.permute(1, 0, 2, 3)).softmax(dim=-1).to(vd.dtype)
        return torch.matmul(probs, vd).transpose(1, 2).reshape(H, B, D)


DECODE_GROUP_FLOOR = 64  # positions: decode rows shorter than this share a group whatever their lengths


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped by length, shortest first, each group's longest at most twice its shortest (or
    DECODE_GROUP_FLOOR): a group's rows are gathered to its longest, so one 8k-position row beside 64 short
    ones costs them their own lengths, not 8k each (3 GB of keys and values for mpt-125m in fp32). The
    gathered keys/values of a group are thus at most twice those its rows hold in the cache."""
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[row] <= 2 * max(lengths[groups[-1][0]], DECODE_GROUP_FLOOR):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups
