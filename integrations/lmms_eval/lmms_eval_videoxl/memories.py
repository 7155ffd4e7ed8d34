"""The encoded memories of recent videos, kept within a byte budget (least recently used first out)."""

from collections import OrderedDict
from typing import Any, Hashable

from loguru import logger as eval_logger


class VideoMemories:
    """Caches (`BeaconCache`) of encoded videos by key (file and frame sampling), at most `budget_bytes` in all.

    A memory larger than the whole budget is not kept (its video's next question encodes it again). `peak_bytes` is
    the most this store ever held, for the benchmark's check against the budget.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._memories: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.peak_bytes = 0

    @property
    def held_bytes(self) -> int:
        return sum(self._sizes.values())

    def get(self, key: Hashable) -> Any | None:
        memory = self._memories.get(key)
        if memory is not None:
            self._memories.move_to_end(key)
        return memory

    def put(self, key: Hashable, memory: Any) -> None:
        """Keep `memory` (replacing any under `key`), dropping the least recently used ones to stay in budget."""
        self.drop(key)
        size = memory.memory_bytes()
        if size > self.budget_bytes:
            eval_logger.warning(
                f"videoxl: one video's memory takes {size / 2**20:.0f} MiB, more than memory_budget_gb "
                f"({self.budget_bytes / 2**30:g} GiB): it is not kept, so each question about it encodes it again"
            )
            return
        while self._memories and self.held_bytes + size > self.budget_bytes:
            self.drop(next(iter(self._memories)))
        self._memories[key] = memory
        self._sizes[key] = size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def refresh(self, key: Hashable) -> None:
        """Recount a stored memory's bytes after it grew (a question's text rows), evicting others if needed."""
        if key in self._memories:
            self.put(key, self._memories[key])

    def drop(self, key: Hashable) -> None:
        self._memories.pop(key, None)
        self._sizes.pop(key, None)

    def clear(self) -> None:
        self._memories.clear()
        self._sizes.clear()
