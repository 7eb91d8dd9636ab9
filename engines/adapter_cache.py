"""Bookkeeping of resident adapters shared by the engines: LRU order, pins, in-flight refcounts and counters.

The cache decides *which* adapter to load or evict; the engine supplies the coroutines that really do it (PEFT
`load_adapter`/`delete_adapter`, or vLLM `add_lora`/`remove_lora`). Rules:
- capacity counts every resident adapter, pinned ones included;
- an adapter with requests in flight (refs > 0) is never evicted; an explicit unload waits for them to finish;
- if every slot is pinned, a new adapter cannot come in: `AdapterCapacityError` (503);
- if every unpinned slot is busy, a request is deferred (`try_acquire` returns False) and retried when one frees.
All methods run on the event loop; one condition serialises them, so loads and evictions never interleave.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engines.base import AdapterHandle
from engines.errors import AdapterCapacityError, AdapterLoadError, AdapterNotLoadedError, EngineOverloadedError

LoadFn = Callable[[AdapterHandle], Awaitable[None]]
UnloadFn = Callable[[int], Awaitable[None]]
PinFn = Callable[[AdapterHandle, bool], Awaitable[None]]


@dataclass
class _Entry:
    handle: AdapterHandle
    pinned: bool = False
    refs: int = 0
    draining: bool = False


@dataclass(frozen=True, slots=True)
class CacheCounters:
    """A snapshot of the cache for `EngineStats`."""

    loaded: tuple[int, ...]
    pinned: tuple[int, ...]
    capacity: int
    loads: int
    evictions: int
    hits: int
    misses: int


class AdapterCache:
    """LRU of resident adapters with pinning and refcounts; `load`/`unload`/`pin_hook` do the engine's work."""

    def __init__(
        self,
        capacity: int,
        load: LoadFn,
        unload: UnloadFn,
        *,
        pin_hook: PinFn | None = None,
        on_change: Callable[[], None] | None = None,
        wait_s: float = 30.0,
    ) -> None:
        self.capacity = capacity
        self._load_fn, self._unload_fn, self._pin_fn = load, unload, pin_hook
        self._on_change = on_change or (lambda: None)
        self._wait_s = wait_s
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._cond = asyncio.Condition()
        self.loads = self.evictions = self.hits = self.misses = 0

    async def try_acquire(self, handle: AdapterHandle) -> bool:
        """Take a reference for one request, loading the adapter if needed; False = no free slot right now."""
        async with self._cond:
            entry = self._entries.get(handle.id)
            if entry is not None:
                if entry.draining:
                    return False
                _check_same(entry, handle)
                self.hits += 1
            elif await self._make_room(handle.id):
                entry = await self._load(handle)
                self.misses += 1
            else:
                return False
            entry.refs += 1
            self._entries.move_to_end(handle.id)
            return True

    async def acquire(self, handle: AdapterHandle) -> None:
        """Take a reference for one request, waiting (up to the wait limit) while every slot is busy."""
        async with self._cond:
            entry = await self._wait_for(lambda: self._resident_or_room(handle), f"serving adapter {handle.id}")
            if entry is None:
                entry = await self._load(handle)
                self.misses += 1
            else:
                _check_same(entry, handle)
                self.hits += 1
            entry.refs += 1
            self._entries.move_to_end(handle.id)

    async def release(self, adapter_id: int) -> None:
        """Drop one request's reference; wakes waiters when the adapter becomes idle."""
        async with self._cond:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1
            self._cond.notify_all()
        self._on_change()

    async def load(self, handle: AdapterHandle, pin: bool = False) -> None:
        """Make an adapter resident (waiting for a busy slot to free, up to the wait limit) and maybe pin it."""
        async with self._cond:
            entry = await self._wait_for(lambda: self._resident_or_room(handle), f"loading adapter {handle.id}")
            if entry is None:
                entry = await self._load(handle)
            _check_same(entry, handle)
            self._entries.move_to_end(handle.id)
            if pin and not entry.pinned:
                await self._set_pinned(entry, True)

    async def unload(self, adapter_id: int) -> None:
        """Remove an adapter once its in-flight requests finish; new requests for it wait meanwhile."""
        async with self._cond:
            entry = self._get(adapter_id)
            entry.draining = True
            try:
                await self._wait_for(lambda: _idle(entry), f"unloading adapter {adapter_id}")
                await self._unload_fn(adapter_id)
            finally:
                entry.draining = False
            del self._entries[adapter_id]
            self._cond.notify_all()
        self._on_change()

    async def pin(self, adapter_id: int, pinned: bool = True) -> None:
        """Pin or unpin a resident adapter."""
        async with self._cond:
            entry = self._get(adapter_id)
            if entry.pinned != pinned:
                await self._set_pinned(entry, pinned)
            self._cond.notify_all()
        self._on_change()

    def rebind(self) -> None:
        """Start over on a new event loop (only while no coroutine is inside the cache)."""
        self._cond = asyncio.Condition()

    def counters(self) -> CacheCounters:
        """Snapshot for stats (loaded in LRU order, least recently used first)."""
        return CacheCounters(
            loaded=tuple(self._entries),
            pinned=tuple(i for i, e in self._entries.items() if e.pinned),
            capacity=self.capacity, loads=self.loads, evictions=self.evictions, hits=self.hits, misses=self.misses,
        )

    def refs(self, adapter_id: int) -> int:
        """In-flight references of an adapter (0 when not resident)."""
        entry = self._entries.get(adapter_id)
        return entry.refs if entry else 0

    async def _resident_or_room(self, handle: AdapterHandle) -> _Entry | bool:
        entry = self._entries.get(handle.id)
        if entry is not None:
            return entry if not entry.draining else False
        return await self._make_room(handle.id)

    async def _wait_for(self, ready: Callable[[], Awaitable[_Entry | bool]], what: str) -> _Entry | None:
        """Wait (lock held between checks) until `ready()` gives an entry or True; returns the entry or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while True:
            outcome = await ready()
            if isinstance(outcome, _Entry):
                return outcome
            if outcome is True:
                return None
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(self._cond.wait(), timeout=max(remaining, 0.0))
            except TimeoutError:
                raise EngineOverloadedError(f"{what}: adapter slots stayed busy for {self._wait_s:g}s") from None

    async def _make_room(self, adapter_id: int) -> bool:
        if len(self._entries) < self.capacity:
            return True
        victim = next((e for e in self._entries.values() if not e.pinned and not e.refs and not e.draining), None)
        if victim is None:
            if all(e.pinned for e in self._entries.values()):
                raise AdapterCapacityError(adapter_id, self.capacity)
            return False
        await self._unload_fn(victim.handle.id)
        del self._entries[victim.handle.id]
        self.evictions += 1
        return True

    async def _load(self, handle: AdapterHandle) -> _Entry:
        await self._load_fn(handle)
        entry = self._entries[handle.id] = _Entry(handle)
        self.loads += 1
        return entry

    async def _set_pinned(self, entry: _Entry, pinned: bool) -> None:
        if self._pin_fn is not None:
            await self._pin_fn(entry.handle, pinned)
        entry.pinned = pinned

    def _get(self, adapter_id: int) -> _Entry:
        entry = self._entries.get(adapter_id)
        if entry is None:
            raise AdapterNotLoadedError(adapter_id)
        return entry


async def _idle(entry: _Entry) -> _Entry | bool:
    return entry if entry.refs == 0 else False


def _check_same(entry: _Entry, handle: AdapterHandle) -> None:
    # Registry ids are never reused, so one id with two keys means a caller bug, not a new version.
    if entry.handle.key != handle.key:
        raise AdapterLoadError(
            handle.id, handle.path, f"id already loaded with key {entry.handle.key}, request names {handle.key}"
        )
