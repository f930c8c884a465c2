"""In-memory caches of what a store holds, each keyed so that it can never serve what the store no longer holds,
and so needs no invalidation: adapters by their checksum, a namespace's cortex by its pointer file.

    >>> adapters = AdapterCache(store, size=16)              # doctest: +SKIP
    >>> adapters.get("heron")                                # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ..adapters import Adapter
from ..schema import DEFAULT_NAMESPACE
from .cortex import Consolidated, pointer, read_cortex
from .manifest import Store

CORTEX_NAMESPACES = 64  # cortexes kept (one per namespace in use); the least recently used is dropped beyond it


class AdapterCache:
    """A memory's adapter, from an LRU of `size` adapters or from disk (checksum-verified; MemoryDamaged if not).
    Keyed by (id, adapter sha256): an id forgotten and added again elsewhere misses, and its stale entry ages out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lru: OrderedDict[tuple[str, str], Adapter] = OrderedDict()

    def get(self, store: Store, memory_id: str) -> Adapter:
        rec = store.get(memory_id)
        key = (rec.id, rec.adapter_sha256)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        adapter = store.adapter(rec)
        if self.size:
            self._lru[key] = adapter
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)
        return adapter


class CortexCache:
    """Each namespace's cortex (megamem.store.cortex): read again only when its pointer file changed (another
    process consolidated), keyed by the file's (mtime, size, inode)."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(store_path)
        self._by_namespace: OrderedDict[str, tuple] = OrderedDict()  # -> (signature, adapter, memories)

    def get(self, namespace: str = DEFAULT_NAMESPACE) -> tuple[Adapter | None, list[Consolidated]]:
        """(the namespace's cortex or None, the memories it holds, oldest first)."""
        try:
            st = pointer(self.path, namespace).stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            sig = None
        cached = self._by_namespace.get(namespace)
        if cached is None or cached[0] != sig:
            found = read_cortex(self.path, namespace) if sig is not None else None
            cached = (sig, *(found[:2] if found else (None, [])))
            self._by_namespace[namespace] = cached
        self._by_namespace.move_to_end(namespace)
        while len(self._by_namespace) > CORTEX_NAMESPACES:
            self._by_namespace.popitem(last=False)
        return cached[1], list(cached[2])
