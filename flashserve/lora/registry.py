"""The engine's side of LoRA serving: which adapters are served, which slot holds each, and the
requests that wait for a slot.

The Workers hold ``max_loras`` slots (``flashserve.lora.layers.AdapterSlots``); the engine may
serve more adapters than that (``max_cpu_loras``), keeping a host copy of each. A request whose
adapter is in a slot goes to the scheduler at once. One whose adapter is not waits here, in
arrival order, until a slot can take its adapter: a free slot, or one whose adapter no unfinished
request uses (the least recently used such adapter is evicted). Once a request waits, later
requests with an adapter wait behind it, so a busy adapter cannot starve another; requests of the
base model never wait. Each load of an adapter under a name has its own id, which salts its
requests' prefix-cache entries (``Request.lora_load``).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from flashserve.lora.adapter import LoRAAdapter, load_adapter
from flashserve.request import Request


@dataclass(frozen=True)
class LoRAStats:
    """Adapters served, slots, slots holding one, requests waiting for a slot (``EngineStats.lora``)."""

    adapters: int
    slots: int
    slots_used: int
    waiting: int


class LoRARegistry:
    """Served adapters and their slots (module docstring). ``executor``: reaches the Workers
    (``check_lora``, ``set_lora``); ``start``: the (name, path) adapters the Workers put in their
    first slots; ``capacity``: adapters served at most (host copies kept when above ``slots``)."""

    def __init__(self, executor, start: Sequence[tuple[str, str]], slots: int, capacity: int) -> None:
        self.executor = executor
        self.slots: list[str | None] = [name for name, _ in start] + [None] * (slots - len(start))
        self.capacity = capacity
        self.swaps = capacity > slots  # adapters move in and out of slots: host copies needed
        # name -> host copy (None: not kept, the adapter never leaves its slot)
        self.adapters: dict[str, LoRAAdapter | None] = {
            name: load_adapter(name, path) if self.swaps else None for name, path in start}
        self.loads = {name: 0 for name, _ in start}  # each served adapter's load id
        self._load_ids = itertools.count(1)
        self._used = itertools.count()
        self.last_used = {name: 0 for name, _ in start}
        self.waiting: deque[Request] = deque()  # requests whose adapter is not in a slot, oldest first
        self.names: tuple[str, ...] = tuple(self.loads)  # replaced whole: server threads read it

    def check(self, name: str | None) -> None:
        """ValueError unless ``name`` is None or a served adapter."""
        if name is not None and name not in self.loads:
            raise ValueError(f"unknown LoRA adapter {name!r}; this engine serves "
                             f"{', '.join(map(repr, self.names)) or 'none'} (lora_modules, add_lora)")

    def add(self, name: str, path: str) -> None:
        """Serve the adapter in folder ``path`` as ``name`` (in a free slot at once, if there is
        one). ValueError / FileNotFoundError, changing nothing, where it cannot be served."""
        if name in self.loads:
            raise ValueError(f"a LoRA adapter named {name!r} is already served; remove it first (remove_lora)")
        if len(self.loads) >= self.capacity:
            raise ValueError(f"this engine serves {self.capacity} LoRA adapters at most "
                             f"({', '.join(map(repr, self.names))}); remove one (remove_lora) or start the engine "
                             f"with a larger max_cpu_loras (adapters kept in host memory beyond the "
                             f"{len(self.slots)} slots of max_loras)")
        adapter = load_adapter(name, path)
        self.executor.check_lora(adapter)
        self.adapters[name] = adapter if self.swaps else None
        if None in self.slots:
            self._place(self.slots.index(None), adapter)
        self.loads[name] = next(self._load_ids)
        self.last_used[name] = next(self._used)
        self.names = tuple(self.loads)

    def remove(self, name: str, users: int) -> None:
        """Stop serving ``name`` (``users``: unfinished requests of it beside those waiting here)."""
        self.check(name)
        users += sum(r.params.lora == name for r in self.waiting)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} unfinished request(s); remove it once "
                             "they finish (or abort them)")
        if name in self.slots:
            self._place(self.slots.index(name), None)
        del self.loads[name], self.adapters[name], self.last_used[name]
        self.names = tuple(self.loads)

    def _place(self, slot: int, adapter: LoRAAdapter | None) -> None:
        self.executor.set_lora(slot, adapter)
        self.slots[slot] = None if adapter is None else adapter.name

    def admits(self, request: Request) -> bool:
        """Whether ``request`` may go to the scheduler now; if not, it waits here."""
        name = request.params.lora
        if name is None:
            return True
        self.last_used[name] = next(self._used)
        if not self.waiting and name in self.slots:
            return True
        self.waiting.append(request)
        return False

    def resident(self, name: str, users: Callable[[str], int]) -> bool:
        """Put ``name`` in a slot if it is not in one and a slot can take it (free, or its adapter
        unused by the unfinished requests ``users`` counts); whether it is in a slot now."""
        if name in self.slots:
            return True
        idle = [i for i, held in enumerate(self.slots) if held is None or not users(held)]
        if not idle:
            return False
        slot = min(idle, key=lambda i: -1 if self.slots[i] is None else self.last_used[self.slots[i]])
        self._place(slot, self.adapters[name])
        return True

    def release(self, users: Callable[[str], int]) -> list[Request]:
        """The waiting requests that may go to the scheduler now, oldest first, their adapters put
        in slots (stops at the first that must keep waiting)."""
        ready: list[Request] = []

        def busy(name: str) -> int:  # the released requests use their adapters too
            return users(name) + sum(r.params.lora == name for r in ready)

        while self.waiting and self.resident(self.waiting[0].params.lora, busy):
            ready.append(self.waiting.popleft())
        return ready

    def stats(self) -> LoRAStats:
        return LoRAStats(len(self.loads), len(self.slots), sum(s is not None for s in self.slots), len(self.waiting))

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget waiting requests (aborted)."""
        gone = set(request_ids)
        self.waiting = deque(r for r in self.waiting if r.request_id not in gone)
