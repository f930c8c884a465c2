"""The record schema: the metadata keys megamem keeps beside a memory's own, and the rules for them.

A stored memory's metadata is the user's fields plus megamem's reserved ones, whose keys start with
`megamem.`; a user's input may never use that prefix, and what a user reads back never shows those keys.
The key `paraphrases` holds the paraphrases a memory was learned from. Every module reads the keys from here.

    >>> user_metadata({"topic": "birds", NAMESPACE: "acme"})
    {'topic': 'birds'}
    >>> stored_id("acme", "note-1")
    'acme--note-1'
"""

from __future__ import annotations

import re

from .checks import check_id
from .errors import MegamemError

PREFIX = "megamem."  # every reserved key starts with it
PARAPHRASES = "paraphrases"  # the texts a memory was learned from beside its own (a user-visible field)
REPLACES = PREFIX + "replaces"  # the ids of older memories this one replaces: the gate leaves them out
MERGED = PREFIX + "merged"  # the members a merged memory holds, each as it was stored (megamem.ops.merge)
NAMESPACE = PREFIX + "namespace"  # the tenant a memory belongs to (none: the default namespace)
USER = PREFIX + "user_id"  # the server's user and agent a memory was added for
AGENT = PREFIX + "agent_id"
RUN = PREFIX + "run_id"  # the server's run (mem0's session scope), beside the user and agent
JOB = PREFIX + "job"  # the server's job that learned it (what makes a retried job exactly-once)
CONSOLIDATED = PREFIX + "consolidated"  # when its adapter was retired into its namespace's cortex (ops.consolidate)
DEFAULT_NAMESPACE = "default"
SEPARATOR = "--"  # a namespace's memory is stored as NAMESPACE--ID (plain in the default namespace)
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_]{0,39}")


def is_reserved(key: str) -> bool:
    """Whether a metadata key is megamem's own."""
    return key.startswith(PREFIX)


def user_metadata(metadata: dict) -> dict:
    """The metadata as its owner gave it: megamem's reserved keys left out."""
    return {k: v for k, v in metadata.items() if not is_reserved(k)}


def reserved_metadata(metadata: dict) -> dict:
    """megamem's own keys of a metadata dict (the rest left out)."""
    return {k: v for k, v in metadata.items() if is_reserved(k)}


def check_user_fields(metadata: dict, where: str, paraphrases: bool = True) -> dict:
    """A user's metadata, or an error naming the rule it breaks: no reserved key, and no 'paraphrases' key when
    the memory has paraphrases (they are stored under it). Type and size are checks.check_metadata's."""
    if any(is_reserved(k) for k in metadata):
        raise MegamemError(f"{where}: keys starting with {PREFIX!r} are megamem's own")
    if PARAPHRASES in metadata and paraphrases:
        raise MegamemError(
            f"{where}: the key {PARAPHRASES!r} holds the memory's paraphrases; give them as paraphrases, "
            "or name the metadata field otherwise"
        )
    return metadata


def check_namespace(name: object) -> str:
    """A namespace: 1-40 lower-case letters, digits and '_', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
        raise MegamemError(
            f"namespace {name!r} must be 1-40 lower-case letters, digits and '_', starting with a letter or digit"
        )
    return name


def check_api_id(memory_id: object) -> str:
    """A memory id as a namespace sees it: a memory id without the namespace separator '--'."""
    memory_id = check_id(memory_id)
    if SEPARATOR in memory_id:
        raise MegamemError(f"memory id {memory_id!r} may not contain {SEPARATOR!r}")
    return memory_id


def namespace_of(record) -> str:
    """The namespace a stored memory (anything with .metadata) belongs to, by its metadata."""
    return record.metadata.get(NAMESPACE, DEFAULT_NAMESPACE)


def stored_id(namespace: str, api_id: str) -> str:
    """The store's id of a namespace's memory (plain in the default namespace)."""
    return api_id if namespace == DEFAULT_NAMESPACE else f"{namespace}{SEPARATOR}{api_id}"


def api_id(record) -> str:
    """The id a namespace sees for a stored memory (anything with .id and .metadata): without its prefix."""
    ns = namespace_of(record)
    prefix = f"{ns}{SEPARATOR}"
    return record.id[len(prefix) :] if ns != DEFAULT_NAMESPACE and record.id.startswith(prefix) else record.id


def owns(namespace: str, record) -> bool:
    """Whether a stored memory is the namespace's: both its metadata and its id's prefix must say so (so one
    tenant cannot even name another's memory)."""
    if namespace_of(record) != namespace:
        return False
    if namespace == DEFAULT_NAMESPACE:
        return SEPARATOR not in record.id
    return record.id.startswith(f"{namespace}{SEPARATOR}")


def is_consolidated(record) -> bool:
    """Whether a stored memory (anything with .metadata) was consolidated: it keeps its text and keys, and its
    namespace's cortex stands in for its retired adapter."""
    return CONSOLIDATED in record.metadata


def replaced_by(metadata: dict) -> list[str]:
    """The ids a memory replaces."""
    return list(metadata.get(REPLACES, []))
