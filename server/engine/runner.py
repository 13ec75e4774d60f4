"""Runs the model on one flat batch: any mix of prefill chunks and decode tokens.

The runner owns the paged KV cache tensors and the vision encoder cache. The scheduler
(or the simple offline loop) tells it, per sequence, which tokens to run and which cache
blocks hold the sequence; the runner builds token ids, M-RoPE positions, slot mapping,
block tables and the image rows that fall into each chunk.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict

import torch

from server.model.images import ProcessedImage
from server.model.layers import AttentionMetadata
from server.model.qwen3_vl import ImageFeatures, MultimodalEmbeds, Qwen3VL
from server.transfer import to_device

from .block_table import BlockTable
from .cuda_graphs import DecodeGraphs
from .sequence import PendingTokens, ScheduledChunk, SequenceData


class ChunkFault(Exception):
    """Preparing one scheduled chunk failed before the model ran (its images, say): the
    fault is that request's, and no shared state has changed yet."""

    def __init__(self, chunk_index: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.chunk_index = chunk_index


class EncoderCache:
    """Vision features by image content hash, LRU-bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(f: ImageFeatures) -> int:
        return f.embeds.numel() * f.embeds.element_size() + f.deepstack.numel() * f.deepstack.element_size()

    def get(self, key: str) -> ImageFeatures | None:
        f = self._items.get(key)
        if f is not None:
            self._items.move_to_end(key)
        return f

    def put(self, key: str, feats: ImageFeatures) -> None:
        if key in self._items:
            return
        self._items[key] = feats
        self._bytes += self._size(feats)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size(old)

    def __len__(self) -> int:
        return len(self._items)


class ModelRunner:
    def __init__(
        self, model: Qwen3VL, num_blocks: int, block_size: int = 16, encoder_cache_bytes: int = 256 << 20
    ):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        t = model.cfg.text
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=model.dtype, device=model.device),
                torch.zeros(shape, dtype=model.dtype, device=model.device),
            )
            for _ in range(t.num_hidden_layers)
        ]
        # grown on demand; the engine sizes it for max_num_seqs x max_model_len up front
        self.block_table = BlockTable(1, 1, model.device)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.vision_runs = 0  # images actually encoded (cache misses), for tests and stats
        # host seconds each sequence's chunks spent getting image rows (the TTFT breakdown's
        # vision_encode; on CUDA the tower's launches are asynchronous: a lower bound)
        self.vision_seconds: weakref.WeakKeyDictionary[SequenceData, float] = weakref.WeakKeyDictionary()
        self.decode_graphs: DecodeGraphs | None = None
        # Most patches encoded in one vision-tower call (the profiled largest image); larger
        # sets of images are encoded in groups so a step never exceeds the profiled peak.
        self.max_encode_patches: int | None = None

    def reserve_block_table(self, max_num_seqs: int, max_model_len: int) -> None:
        """Size the persistent block table for every step the scheduler can make."""
        self.block_table.reserve(max_num_seqs, -(-max_model_len // self.block_size))

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Serve pure-decode steps from CUDA graphs (capture=False: the same static-buffer
        path run eagerly, the CPU twin). Call after the KV pool exists: graphs bake in its
        addresses, and the block table's (which stops growing)."""
        self.reserve_block_table(max_num_seqs, max_model_len)
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.block_table,
            max_num_seqs,
            max_model_len,
            self.block_size,
            capture,
        )
        self.block_table.frozen = True
        self.decode_graphs.capture_all()

    @torch.inference_mode()
    def warm_up(
        self,
        prefill_sizes: list[int],
        max_num_seqs: int = 0,
        max_model_len: int | None = None,
        images: bool = False,
    ) -> None:
        """Run once, before traffic, every kind of step the engine can launch, so that no
        kernel compiles and no qmatmul M bucket is timed in the middle of traffic (a Triton
        specialization first met mid-traffic stalls the step 0.3-5 s):
        - a prefill of each size (the engine's: powers of two to max_num_batched_tokens, and
          that: every M bucket, each query-tile plan); with max_model_len, each also as the
          last tokens of a max_model_len context (the plans that split a long context);
        - decodes of each power-of-two batch to max_num_seqs, and max_num_seqs: the fused
          decode attention, the logits' row counts; with max_model_len, one at that context;
        - with images, the vision tower on a one-token image and on a 16-token one (the two
          query-tile plans of its attention).
        Every chunk's blocks are block 0 (all reads, all writes: garbage no sequence holds
        yet), so the pool's size bounds nothing here: call it before serving."""
        bs = self.block_size

        def chunk(length: int, tokens: int) -> ScheduledChunk:
            data = SequenceData.from_prompt([1] * length, [], torch.arange(length).expand(3, -1), 0)
            return ScheduledChunk(data, length - tokens, length, [0] * -(-length // bs))

        for m in prefill_sizes:
            self.forward([chunk(m, m)])
            if max_model_len is not None and max_model_len > m:
                self.forward([chunk(max_model_len, m)])
        for b in powers_of_two_to(max_num_seqs) if max_num_seqs else []:
            self.run([chunk(1, 1) for _ in range(b)])
        if max_num_seqs and max_model_len is not None and max_model_len > 1:
            self.run([chunk(max_model_len, 1)])
        if images:
            v = self.model.cfg.vision
            merge = v.spatial_merge_size
            for side in (merge, 4 * merge):
                pixels = torch.randn(side * side, v.in_channels * v.temporal_patch_size * v.patch_size**2)
                self.model.encode_images(pixels, [(1, side, side)])  # float32, as the processor makes

    def image_features(self, images: list[ProcessedImage]) -> list[ImageFeatures]:
        """Features for each image, running the vision tower only for cache misses. Hits are
        taken before anything is stored: storing new features may evict them."""
        found: dict[str, ImageFeatures] = {}
        for im in images:
            f = self.encoder_cache.get(im.content_hash)
            if f is not None:
                found[im.content_hash] = f
        self.encoder_cache.hits += sum(1 for im in images if im.content_hash in found)
        unique = list({im.content_hash: im for im in images if im.content_hash not in found}.values())
        for group in _patch_groups(unique, self.max_encode_patches):
            pixels = torch.cat([im.pixel_values for im in group])
            feats = self.model.encode_images(pixels, [im.grid_thw for im in group])
            for im, f in zip(group, feats):
                found[im.content_hash] = f
                self.encoder_cache.put(im.content_hash, f)
            self.vision_runs += len(group)
            self.encoder_cache.misses += len(group)
        return [found[im.content_hash] for im in images]

    def _mm_rows(self, chunk: ScheduledChunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Image-token mask of the chunk and the feature rows (main + deepstack) inside it.
        Only the images the chunk overlaps are encoded (or taken from the encoder cache)."""
        seq = chunk.seq
        n_prompt = seq.num_prompt_tokens
        if not seq.images or chunk.start >= n_prompt:
            return None
        t0 = time.monotonic()
        start, end = chunk.start, min(chunk.end, n_prompt)
        image_token_id = self.model.cfg.image_token_id
        inside = [
            (im, s, e)
            for im, (s, e) in zip(seq.images, seq.image_spans(image_token_id))
            if s < end and e > start
        ]
        if not inside:
            return None
        feats = self.image_features([im for im, _, _ in inside])
        cuts = [(max(start, s) - s, min(end, e) - s) for _, s, e in inside]
        embeds = torch.cat([f.embeds[a:b] for f, (a, b) in zip(feats, cuts)])
        deep = torch.cat([f.deepstack[:, a:b] for f, (a, b) in zip(feats, cuts)], dim=1)
        mask = torch.zeros(chunk.end - chunk.start, dtype=torch.bool)
        mask[: end - start] = seq.image_mask(image_token_id)[start:end]
        self.vision_seconds[seq] = self.vision_seconds.get(seq, 0.0) + time.monotonic() - t0
        return mask, embeds, deep

    def _place(self, chunks: list[ScheduledChunk]) -> tuple[list[int], int]:
        """Each chunk's row in the block table (rows 0..n-1, up to date) and the batch's
        widest context in blocks."""
        bs = self.block_size
        widths = [-(-c.end // bs) for c in chunks]
        rows = self.block_table.place([c.seq for c in chunks], [c.block_table for c in chunks], widths)
        self.block_table.sync()
        return rows, max(widths)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], pending: PendingTokens | None = None) -> torch.Tensor:
        """Run one step; returns fp32 logits [num chunks wanting logits, vocab] (last token each).

        A chunk may end one token past its sequence's known tokens: that token is in `pending`."""
        rows, width = self._place(chunks)
        graphs = self.decode_graphs
        if graphs is not None and _all_decodes(chunks) and graphs.can_run(len(chunks), width):
            hidden = self._run_decode_graph(graphs, chunks, rows, pending)
            return self.model.compute_logits(_in_chunk_order(hidden, rows))
        hidden, ends = self._forward(chunks, rows, width, pending)
        last = [end - 1 for c, end in zip(chunks, ends) if c.want_logits]
        if last == list(range(hidden.shape[0])):  # every token, in order (a decode step)
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden.index_select(0, to_device(last, hidden.device, torch.long)))

    def _run_decode_graph(
        self,
        graphs: DecodeGraphs,
        chunks: list[ScheduledChunk],
        rows: list[int],
        pending: PendingTokens | None,
    ) -> torch.Tensor:
        """Hidden states of the decodes, in row order."""
        n = len(chunks)
        ids, pos, lens, at = [0] * n, [0] * n, [0] * n, [0] * n
        fill = _Fill()
        for c, r in zip(chunks, rows):
            p = c.start
            if p < len(c.seq.token_ids):
                ids[r] = c.seq.token_ids[p]
            else:
                fill.add(r, c.seq, pending)
            pos[r] = p + c.seq.rope_delta
            at[r] = p
            lens[r] = c.end
        slots = self.block_table.slots(list(range(n)), at, self.block_size)
        return graphs.run(ids, pos, slots, lens, fill.tensors(pending, self.model.device))

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk], pending: PendingTokens | None = None) -> torch.Tensor:
        """Run one step; returns the final hidden state of every scheduled token [T, hidden],
        in chunk order."""
        rows, width = self._place(chunks)
        hidden, ends = self._forward(chunks, rows, width, pending)
        if rows == sorted(rows):
            return hidden
        starts = [end - (c.end - c.start) for c, end in zip(chunks, ends)]
        order = [t for s, c in zip(starts, chunks) for t in range(s, s + c.end - c.start)]
        return hidden.index_select(0, to_device(order, hidden.device, torch.long))

    def _forward(
        self, chunks: list[ScheduledChunk], rows: list[int], width: int, pending: PendingTokens | None
    ) -> tuple[torch.Tensor, list[int]]:
        """The model over the placed chunks, laid out in row order (row i's tokens are the
        batch's i-th sequence, as the block table view has them). Returns the hidden states
        [T, hidden] in that layout and where each chunk's tokens end in it.

        Per-step Python is kept to list appends and one tensor per field: at 2B a decode step
        on a GPU takes about as long as a few hundred small torch calls would."""
        n = len(chunks)
        by_row = [0] * n
        for index, r in enumerate(rows):
            by_row[r] = index
        ids: list[int] = []
        tok_rows: list[int] = []  # row and position of each token: its KV slot
        tok_pos: list[int] = []
        q_loc, seq_lens = [0], []
        ends = [0] * n
        pos_parts: list[torch.Tensor] = []
        text_pos: list[int] = []  # run of positions equal on all three M-RoPE axes
        mm_parts: list[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        fill = _Fill()
        longest = 1  # max_query_len: decode rows have one token
        for r, index in enumerate(by_row):
            c = chunks[index]
            seq, start, end = c.seq, c.start, c.end
            tokens = seq.token_ids
            if end > len(tokens):  # the last token is still on the device
                fill.add(len(ids) + end - 1 - start, seq, pending)
            if end - start == 1 and start >= seq.num_prompt_tokens:  # a decode: the common row
                ids.append(tokens[start] if start < len(tokens) else 0)
                tok_rows.append(r)
                tok_pos.append(start)
                text_pos.append(start + seq.rope_delta)  # t = h = w = index + delta
            else:
                longest = max(longest, end - start)
                ids += tokens[start:end]
                if end > len(tokens):
                    ids.append(0)  # filled from the device
                tok_rows += [r] * (end - start)
                tok_pos += range(start, end)
                if start >= seq.num_prompt_tokens:  # generated tokens: t = h = w = index + delta
                    text_pos += range(start + seq.rope_delta, end + seq.rope_delta)
                else:
                    if text_pos:
                        pos_parts.append(torch.tensor(text_pos).expand(3, -1))
                        text_pos = []
                    pos_parts.append(seq.positions(start, end))
                    try:
                        mm = self._mm_rows(c)
                    except Exception as e:  # this request's images: fail it, not the step
                        raise ChunkFault(index, e) from e
                    if mm is not None:
                        mm_parts.append((q_loc[-1], mm))
            q_loc.append(q_loc[-1] + end - start)
            ends[index] = q_loc[-1]
            seq_lens.append(end)
        if text_pos:
            pos_parts.append(torch.tensor(text_pos).expand(3, -1))
        dev = self.model.device
        meta = AttentionMetadata(
            slot_mapping=to_device(self.block_table.slots(tok_rows, tok_pos, self.block_size), dev),
            block_tables=self.block_table.view(n, width),
            seq_lens=to_device(seq_lens, dev, torch.long),
            query_start_loc=to_device(q_loc, dev, torch.long),
            max_query_len=longest,
            max_seq_len=max(seq_lens),
        )
        mm_embeds = None
        if mm_parts:
            mask = torch.zeros(len(ids), dtype=torch.bool)
            for offset, (m, _, _) in mm_parts:
                mask[offset : offset + m.numel()] = m
            mm_embeds = MultimodalEmbeds(
                to_device(mask.nonzero().flatten(), dev),  # positions found on the host
                torch.cat([e for _, (_, e, _) in mm_parts]),
                torch.cat([d for _, (_, _, d) in mm_parts], dim=1),
            )
        positions = pos_parts[0] if len(pos_parts) == 1 else torch.cat(pos_parts, dim=1)
        ids_t = to_device(ids, dev, torch.long)
        filled = fill.tensors(pending, dev)
        if filled is not None:
            ids_t.index_copy_(0, *filled)
        hidden = self.model(ids_t, to_device(positions, dev, torch.long), self.kv_caches, meta, mm_embeds)
        return hidden, ends


def powers_of_two_to(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    return [1 << i for i in range(max(0, n - 1).bit_length()) if 1 << i < n] + [n]


def _all_decodes(chunks: list[ScheduledChunk]) -> bool:
    """One generated-position token per sequence, each wanting logits: what the graphs run."""
    return all(c.end - c.start == 1 and c.start >= c.seq.num_prompt_tokens and c.want_logits for c in chunks)


def _in_chunk_order(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Row-ordered hidden states [>= n, H] back in chunk order (chunk i sits at rows[i])."""
    if rows == list(range(len(rows))):
        return hidden[: len(rows)]
    return hidden.index_select(0, to_device(rows, hidden.device, torch.long))


def _patch_groups(images: list[ProcessedImage], max_patches: int | None) -> list[list[ProcessedImage]]:
    """Consecutive groups of images with at most max_patches patches each (an image larger
    than that alone; None: one group)."""
    if max_patches is None:
        return [images] if images else []
    groups: list[list[ProcessedImage]] = []
    size = 0
    for im in images:
        n = im.pixel_values.shape[0]
        if groups and size + n <= max_patches:
            groups[-1].append(im)
            size += n
        else:
            groups.append([im])
            size = n
    return groups


class _Fill:
    """Batch positions whose token id comes from the in-flight step's sampled tokens."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.rows: list[int] = []

    def add(self, position: int, seq: SequenceData, pending: PendingTokens | None) -> None:
        if pending is None or seq not in pending.rows:
            raise RuntimeError("a scheduled token is neither known nor pending")
        self.positions.append(position)
        self.rows.append(pending.rows[seq])

    def tensors(
        self, pending: PendingTokens | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, token ids) on the device, for index_copy_ into the input ids."""
        if not self.positions or pending is None:
            return None
        rows = to_device(self.rows, device, torch.long)
        return to_device(self.positions, device, torch.long), pending.ids.index_select(0, rows)
