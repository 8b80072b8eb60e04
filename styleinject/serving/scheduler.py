"""The scheduler: which waiting requests join the active batch, and which batch runs next.

Iteration-level (continuous) batching: requests are admitted before every step, up to
``max_batch`` UNet rows per latent size (a request with guidance counts twice), in arrival order;
a request that does not fit waits without blocking smaller ones behind it. Requests of different
latent sizes run in separate batches, taken in turn, so a long 1024 px request never stops a
32 px one from advancing.
"""

from __future__ import annotations

from collections import deque

from styleinject.serving.request import Active


class Scheduler:
    def __init__(self, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: deque = deque()  # (Request, Future), in arrival order
        self.active: dict[tuple[int, int], list[Active]] = {}
        self._turn = 0

    def rows(self, size: tuple[int, int]) -> int:
        return sum(a.unet_rows for a in self.active.get(size, ()))

    def fits(self, size: tuple[int, int], unet_rows: int) -> bool:
        """A request fits if its size group has room, or the group is empty (a request larger than
        ``max_batch`` still runs, alone)."""
        used = self.rows(size)
        return used == 0 or used + unet_rows <= self.max_batch

    def add(self, active: Active) -> None:
        self.active.setdefault(active.size, []).append(active)

    def next_batch(self) -> list[Active]:
        """The next size group to step (round robin over the groups that have work)."""
        sizes = sorted(size for size, group in self.active.items() if group)
        if not sizes:
            return []
        self._turn = (self._turn + 1) % len(sizes)
        return self.active[sizes[self._turn]]

    def retire(self) -> list[Active]:
        """Remove and return the requests that have taken all their steps."""
        done = []
        for size in list(self.active):
            group = self.active[size]
            done += [a for a in group if a.done]
            self.active[size] = [a for a in group if not a.done]
            if not self.active[size]:
                del self.active[size]
        return done

    def remove(self, active: Active) -> None:
        group = self.active.get(active.size, [])
        if active in group:
            group.remove(active)

    @property
    def num_active(self) -> int:
        return sum(len(group) for group in self.active.values())

    def position(self, request_id: str) -> int | None:
        """0-based place in the waiting queue; None when running or unknown."""
        for index, (request, _) in enumerate(self.waiting):
            if request.id == request_id:
                return index
        return None
