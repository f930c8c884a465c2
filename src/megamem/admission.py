"""Admission: whether items may become memories, checked before anything is learned or stored.

check_items does the cheap checks (text, paraphrases, metadata, ids, replaces) with no model; fitting_items
then checks that every text fits the model's context. Every way a memory comes in (an add, a batch, a server
job, a merge) runs these, so a bad item is one clear error before any expensive work.

    >>> good, bad = check_items([Item("Ann Lee is a Welsh chemist."), Item("")], store=None)
    >>> len(good), bad
    (1, ['memory 2 text is empty'])
"""

from __future__ import annotations

from .checks import check_id, check_metadata, check_text, check_texts, sift
from .errors import MegamemError
from .items import Item
from .routing import superseded
from .schema import check_user_fields
from .store import Store
from .store.cortex import held_ids
from .train import check_fits


def where_of(item: Item, n: int, count: int) -> str:
    """How messages name an item: its origin, or its place in the batch."""
    return item.origin or (f"memory {n}" if count > 1 else "memory")


def check_items(items: list[Item], store: Store | None) -> tuple[list[Item], list[str]]:
    """Cleaned copies of the good items, and one message a bad one (naming it). Ids must be unique in the batch
    and new to the store, and not one a stored memory replaces (the gate would leave it out from the start)."""
    seen: dict[str, str] = {}
    given = any(item.id is not None for item in items)
    replaced = superseded(store.records()) if given and store is not None else set()
    consolidated = held_ids(store.path) if given and store is not None else {}

    def check(n: int, item: Item) -> Item:
        where = where_of(item, n, len(items))
        text = check_text(item.text, f"{where} text")
        paras = check_texts(item.paraphrases, f"{where} paraphrases")
        meta = check_metadata(item.metadata, f"{where} metadata")
        check_user_fields(meta, f"{where} metadata", paraphrases=bool(paras))
        olds = check_replaces(item.replaces, where, seen, store)
        if item.id is not None:
            check_new_id(item.id, where, seen, store, replaced)
            if item.id in consolidated:
                raise MegamemError(
                    f"{where}: id {item.id!r} is a consolidated memory's (the {consolidated[item.id]} cortex holds "
                    f"it); forget it first (`megamem forget {item.id}`) or choose another id"
                )
            seen[item.id] = where
        return Item(text, paras, meta, item.id, item.origin, olds, dict(item.reserved))

    return sift(items, check, keep_going=True)


def check_new_id(memory_id: object, where: str, seen: dict[str, str], store: Store | None, replaced: set) -> None:
    """A new memory's id: well formed, unused in the batch and the store, and not one a stored memory replaces."""
    check_id(memory_id, f"{where} id")
    if memory_id in seen:
        raise MegamemError(f"{where}: id {memory_id!r} is used twice (also by {seen[memory_id]})")
    if store is not None and store.get(memory_id, missing_ok=True) is not None:
        raise MegamemError(f"{where}: a memory with id {memory_id!r} already exists")
    if memory_id in replaced:
        raise MegamemError(
            f"{where}: id {memory_id!r} is one a stored memory replaces (or holds, merged); choose another id"
        )


def check_replaces(replaces: object, where: str, earlier: dict[str, str], store: Store | None) -> list[str]:
    """The ids a new memory replaces: stored memories, or memories earlier in the same batch."""
    if isinstance(replaces, str) or not isinstance(replaces, (list, tuple)):
        raise MegamemError(f"{where}: replaces must be a list of memory ids")
    out = []
    for old in replaces:
        check_id(old, f"{where} replaces id")
        if old not in earlier and (store is None or store.get(old, missing_ok=True) is None):
            raise MegamemError(f"{where} replaces {old!r}, which is not a stored memory")
        out.append(old)
    return out


def fitting_items(items: list[Item], model, tok, keep_going: bool) -> tuple[list[Item], list[str]]:
    """The items whose every text fits the model's context, and a message for each that does not (keep_going;
    otherwise the first that does not is raised)."""

    def fits(n: int, item: Item) -> Item:
        for t in [item.text, *item.paraphrases]:
            check_fits(tok, model, t, where_of(item, n, len(items)))
        return item

    return sift(items, fits, keep_going)
