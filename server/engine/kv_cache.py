"""Paged KV block manager with reference counts and prefix caching.

A block holds `block_size` tokens of one sequence's KV. Full blocks whose KV has been
computed are registered under a chained hash (parent hash, token ids, content hashes of
any images whose tokens fall in the block), so a later sequence with the same prefix reuses
them. Unreferenced cached blocks stay in an LRU and are evicted only when a fresh block is
needed; every block is always exactly one of: referenced, cached-idle, or free.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

BlockKey = tuple[int | None, tuple[int, ...], tuple[str, ...]]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and its KV computed
    hash: int | None = None


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from cache


@dataclass
class BlockSpans:
    """Which images' tokens fall in a token range: (start, end, content hash) per image."""

    spans: list[tuple[int, int, str]] = field(default_factory=list)

    def hashes_in(self, start: int, end: int) -> tuple[str, ...]:
        return tuple(h for s, e, h in self.spans if s < end and e > start)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))  # never hashed or hash dropped
        self.cached_idle: OrderedDict[int, None] = OrderedDict()  # hashed, ref 0, LRU order
        self.by_hash: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixStats()

    # -- accounting ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.cached_idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def check_invariants(self) -> None:
        """Every block is exactly one of referenced / cached-idle / free (tests call this)."""
        free, idle = set(self.free), set(self.cached_idle)
        assert not free & idle, "a block is both free and cached"
        for b in self.blocks:
            if b.ref_count > 0:
                assert b.block_id not in free and b.block_id not in idle, (
                    f"block {b.block_id} referenced and free"
                )
            else:
                assert (b.block_id in free) != (b.block_id in idle), f"block {b.block_id} leaked"
                assert (b.block_id in idle) == (b.hash is not None), f"block {b.block_id} cache state"

    # -- allocation ------------------------------------------------------------------------

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_fresh(self) -> int:
        if self.free:
            bid = self.free.popleft()
        else:
            bid, _ = self.cached_idle.popitem(last=False)  # evict the least recently used
            blk = self.blocks[bid]
            if blk.hash is not None and self.by_hash.get(blk.hash) == bid:
                del self.by_hash[blk.hash]
            blk.hash, blk.key = None, None
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            self.cached_idle.pop(bid, None)
        blk.ref_count += 1

    @staticmethod
    def block_key(parent: int | None, tokens: list[int], images: tuple[str, ...]) -> tuple[BlockKey, int]:
        key: BlockKey = (parent, tuple(tokens), images)
        return key, hash(key)

    def lookup_prefix(self, token_ids: list[int], spans: BlockSpans, max_blocks: int) -> list[int]:
        """Cached block ids for the longest cached prefix of whole blocks (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range(min(max_blocks, len(token_ids) // bs)):
            key, h = self.block_key(
                parent, token_ids[i * bs : (i + 1) * bs], spans.hashes_in(i * bs, (i + 1) * bs)
            )
            bid = self.by_hash.get(h)
            if bid is None or self.blocks[bid].key != key:
                break
            found.append(bid)
            parent = h
        return found

    def allocate_prompt(
        self, token_ids: list[int], spans: BlockSpans, reserve: int = 0, count_stats: bool = True
    ) -> tuple[list[int], int] | None:
        """Blocks for a prompt (+ `reserve` more tokens): reuses cached prefix blocks, leaves at
        least the last prompt token to compute. Returns (block table, cached token count) or
        None when the pool cannot hold it right now. `count_stats=False`: not a new query (a
        preempted sequence coming back finds its own blocks, which is no prefix-cache hit)."""
        n = len(token_ids)
        hits = self.lookup_prefix(token_ids, spans, max_blocks=(n - 1) // self.block_size)
        need = self.blocks_needed(n + reserve) - len(hits)
        # cached-idle blocks we are about to reuse are not available for fresh allocation
        idle_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need > self.num_available - idle_hits:
            return None
        for bid in hits:
            self._ref(bid)
        table = hits + [self._take_fresh() for _ in range(need)]
        if count_stats:
            self.stats.queries += n
            self.stats.hits += len(hits) * self.block_size
        return table, len(hits) * self.block_size

    def can_append(self, num_blocks: int = 1) -> bool:
        return self.num_available >= num_blocks

    def append_block(self, table: list[int]) -> bool:
        if not self.num_available:
            return False
        table.append(self._take_fresh())
        return True

    def fork(self, table: list[int]) -> list[int]:
        """Share every block of `table` with a new sequence (copy-free: ref counts)."""
        for bid in table:
            self._ref(bid)
        return list(table)

    def register_computed(
        self, table: list[int], token_ids: list[int], spans: BlockSpans, first_block: int, num_computed: int
    ) -> int:
        """Hash full blocks whose KV is now computed, from `first_block`; returns the index of
        the first block still unregistered (the caller keeps it to avoid rehashing)."""
        if not self.enable_prefix_caching:
            return first_block
        bs = self.block_size
        parent = self.blocks[table[first_block - 1]].hash if first_block > 0 else None
        i = first_block
        while (i + 1) * bs <= num_computed and i < len(table):
            blk = self.blocks[table[i]]
            key, h = self.block_key(
                parent, token_ids[i * bs : (i + 1) * bs], spans.hashes_in(i * bs, (i + 1) * bs)
            )
            if blk.hash is None:
                blk.key, blk.hash = key, h
                self.by_hash.setdefault(h, blk.block_id)
            parent = blk.hash
            i += 1
        return i

    def free_table(self, table: list[int]) -> None:
        """Drop one reference to each block; idle hashed blocks stay cached (LRU), others free.
        Freed in reverse so a sequence's tail is evicted before its (more shared) head."""
        for bid in reversed(table):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            assert blk.ref_count >= 0, f"block {bid} freed twice"
            if blk.ref_count == 0:
                if blk.hash is not None and self.by_hash.get(blk.hash) == bid:
                    self.cached_idle[bid] = None
                else:
                    blk.hash, blk.key = None, None
                    self.free.append(bid)
        table.clear()

    def reset_prefix_cache(self) -> None:
        for bid in list(self.cached_idle):
            blk = self.blocks[bid]
            blk.hash, blk.key = None, None
            self.free.append(bid)
        self.cached_idle.clear()
        self.by_hash = {h: b for h, b in self.by_hash.items() if self.blocks[b].hash == h}
