"""Sequence packing: best-fit-decreasing bins of documents, batched, split across ranks.

Modes (`DataLoaderConfig.mode` / `PackedBatches(mode=...)`):
- "packed": documents packed into rows of `max_seq_len` tokens, `batch_size` rows per
  micro-batch ([batch_size, max_seq_len]; the last micro-batch may have fewer rows);
- "flat": padding-free; documents packed into one row per micro-batch holding at most
  `token_budget` tokens ([1, tokens], no padding at all);
- "padded": one document per row, right-padded, `batch_size` rows (for comparisons, and for
  models whose attention cannot take packed input).
Collation and the batch format are in fastft.data.collate; see there for the label shift rule
(each document's first label is -100, so no loss term crosses a document boundary) and for
`model_inputs` (use_cache=False with the stock attention).

Best-fit decreasing (Johnson, 1973; a classic bin-packing heuristic within 11/9 OPT + 1 bins):
take documents longest first and put each into the open bin with the least room that still
fits it, opening a new bin when none does. Ties in length are broken by a seeded random key, so
a seed (and epoch) fixes the packing, and different epochs give different row compositions.
Micro-batches are then shuffled with the same seed and dealt to data-parallel ranks round-robin;
the few left over when their number is not a multiple of the world size are dropped (counted),
so every rank runs the same number of steps and no document is seen by two ranks.

Map-style input (a list or `datasets.Dataset`) is planned whole; a stream (any other iterable,
e.g. `datasets.IterableDataset`) is planned per buffer of `buffer_size` documents. Every rank
reads the whole stream and makes the same plan, then keeps its own share.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence

from fastft.data.collate import collate_packed, collate_padded

MODES = ("packed", "flat", "padded")


def best_fit_decreasing(lengths: Sequence[int], capacity: int, *, seed: int = 0) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) with the sum of each bin's lengths <= `capacity`."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"{len(too_long)} document(s) longer than the packing capacity {capacity} (first: #{i}, {n} tokens); "
            "encode with max_seq_len <= the capacity so that they are truncated or dropped"
        )
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], rng.random()))
    bins: list[list[int]] = []
    # Open bins sorted by free room: `rooms[k]` is the free room of bin `bin_of[k]`.
    rooms: list[int] = []
    bin_of: list[int] = []
    for i in order:
        n = lengths[i]
        if n == 0:
            raise ValueError(f"document #{i} is empty; drop empty examples before packing")
        k = bisect.bisect_left(rooms, n)  # the tightest bin that fits
        if k == len(rooms):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = rooms.pop(k) - n, bin_of.pop(k)
            bins[b].append(i)
        if room > 0:
            k = bisect.bisect_left(rooms, room)
            rooms.insert(k, room)
            bin_of.insert(k, b)
    return bins


@dataclasses.dataclass
class PackingStats:
    documents: int = 0
    real_tokens: int = 0
    slots: int = 0  # token positions in the micro-batches (real + padding)
    micro_batches: int = 0
    dropped_micro_batches: int = 0  # left over when dealing to ranks

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots (for "flat", the slots are `token_budget` per micro-batch)."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def add(self, other: "PackingStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class PackedBatches:
    """An iterable of micro-batches (dicts of tensors) for one rank. Call `set_epoch` per epoch.

    examples: encoded examples ({"input_ids", "labels"} per item), map-style or a stream.
    max_seq_len: the longest document, and the row length in "packed" mode.
    batch_size: rows per micro-batch ("packed", "padded"). token_budget: tokens per micro-batch ("flat").
    """

    def __init__(
        self,
        examples,
        *,
        pad_id: int,
        max_seq_len: int,
        mode: str = "packed",
        batch_size: int = 1,
        token_budget: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 10_000,
        shuffle: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown batching mode {mode!r}; use one of {MODES}")
        if mode == "flat":
            if token_budget is None or token_budget < max_seq_len:
                raise ValueError(
                    f"mode='flat' needs token_budget >= max_seq_len ({max_seq_len}) so that every document fits, "
                    f"got {token_budget}"
                )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.pad_id, self.max_seq_len, self.mode = pad_id, max_seq_len, mode
        self.batch_size, self.token_budget = batch_size, token_budget
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer_size, self.shuffle = buffer_size, shuffle
        self.epoch = 0
        self.map_style = hasattr(examples, "__len__") and hasattr(examples, "__getitem__")
        self.stats = PackingStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- planning: which documents go in which row of which micro-batch --------------------------
    def _plan(self, lengths: Sequence[int], seed: int) -> tuple[list[list[list[int]]], PackingStats]:
        """Micro-batches (lists of rows, each a list of indices into `lengths`) for this rank."""
        if self.mode == "padded":
            order = list(range(len(lengths)))
            too_long = [i for i in order if lengths[i] > self.max_seq_len]
            if too_long:
                raise ValueError(f"document #{too_long[0]} has {lengths[too_long[0]]} tokens > max_seq_len={self.max_seq_len}")
            if self.shuffle:
                random.Random(seed).shuffle(order)
            batches = [[[i] for i in order[s : s + self.batch_size]] for s in range(0, len(order), self.batch_size)]
        else:
            capacity = self.token_budget if self.mode == "flat" else self.max_seq_len
            if self.mode == "flat":
                over = [n for n in lengths if n > self.max_seq_len]
                if over:
                    raise ValueError(f"a document has {over[0]} tokens > max_seq_len={self.max_seq_len}")
            rows = best_fit_decreasing(lengths, capacity, seed=seed)
            if self.shuffle:
                random.Random(seed + 1).shuffle(rows)
            per_batch = 1 if self.mode == "flat" else self.batch_size
            batches = [rows[s : s + per_batch] for s in range(0, len(rows), per_batch)]
        stats = PackingStats(documents=len(lengths), real_tokens=sum(lengths))
        for batch in batches:
            if self.mode == "packed":
                stats.slots += len(batch) * self.max_seq_len
            elif self.mode == "flat":
                stats.slots += self.token_budget
            else:
                stats.slots += len(batch) * max(lengths[i] for row in batch for i in row)
        stats.micro_batches = len(batches)
        keep = len(batches) - len(batches) % self.world_size
        stats.dropped_micro_batches = len(batches) - keep
        return batches[:keep][self.rank :: self.world_size], stats

    def _collate(self, rows: list[list[dict]]) -> dict:
        if self.mode == "padded":
            return collate_padded([row[0] for row in rows], pad_id=self.pad_id)
        return collate_packed(rows, pad_id=self.pad_id, row_len=self.max_seq_len if self.mode == "packed" else None)

    def _buffers(self) -> Iterator[tuple[Sequence[dict] | None, list[int]]]:
        if self.map_style:
            yield None, _lengths(self.examples)
            return
        iterator = iter(self.examples)
        while True:
            buffer = list(itertools.islice(iterator, self.buffer_size))
            if not buffer:
                return
            yield buffer, [len(e["input_ids"]) for e in buffer]

    def plan(self) -> list[list[list[int]]]:
        """This rank's micro-batches for the current epoch, as index lists (map-style input only)."""
        if not self.map_style:
            raise TypeError("plan() needs map-style examples; a stream is planned buffer by buffer while iterating")
        batches, self.stats = self._plan(_lengths(self.examples), self._seed(0))
        return batches

    def _seed(self, buffer_index: int) -> int:
        # A string seed: random.Random hashes it with SHA-512, the same in every process and run.
        return random.Random(f"fastft-packing-{self.seed}-{self.epoch}-{buffer_index}").getrandbits(31)

    def __iter__(self) -> Iterator[dict]:
        self.stats = PackingStats()
        for k, (buffer, lengths) in enumerate(self._buffers()):
            batches, stats = self._plan(lengths, self._seed(k))
            self.stats.add(stats)
            source = self.examples if buffer is None else buffer
            for batch in batches:
                yield self._collate([[_example(source[i]) for i in row] for row in batch])

    def __len__(self) -> int:
        return len(self.plan())

    def describe(self) -> str:
        """One line for the start-up log (map-style: computed now; a stream: after iterating)."""
        if self.map_style:
            self.plan()
        s = self.stats
        shape = {"packed": f"rows of {self.max_seq_len} tokens, {self.batch_size} per micro-batch",
                 "flat": f"one padding-free row of <= {self.token_budget} tokens per micro-batch",
                 "padded": f"{self.batch_size} padded rows per micro-batch"}[self.mode]
        return (f"{self.mode}: {s.documents} documents, {s.real_tokens} tokens in {s.micro_batches} micro-batches "
                f"({shape}); efficiency {100 * s.efficiency:.1f}% real tokens per slot; "
                f"{s.micro_batches // self.world_size} micro-batches per rank x {self.world_size} rank(s)"
                + (f", {s.dropped_micro_batches} dropped to keep ranks even" if s.dropped_micro_batches else ""))


def _example(item: dict) -> dict:
    return {"input_ids": item["input_ids"], "labels": item["labels"]}


def _lengths(examples) -> list[int]:
    try:  # a datasets.Dataset: read the lengths from Arrow without materialising the rows
        import pyarrow.compute as pc

        table = examples.with_format("arrow")[:]
        return pc.list_value_length(table["input_ids"]).to_pylist()
    except (AttributeError, ImportError, KeyError, TypeError):
        return [len(e["input_ids"]) for e in examples]
