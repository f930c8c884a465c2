"""A namespace's cortex on disk: the adapter its consolidated memories were rehearsed into, and their record.

    STORE/cortex/current.json            the default namespace's live version and its memories
    STORE/cortex/<version>/              its adapter (PEFT files, bfloat16)
    STORE/cortex/<namespace>/...         another namespace's, laid out the same way

A version's name always holds a '-' and a namespace's never does, so the two cannot collide. A new version is
written beside the old one, then current.json is switched to it (the commit: a crash before leaves the old
cortex live), then the old version is removed. megamem.ops.consolidate trains what is written here.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..adapters import Adapter, file_sha256, load_adapter, save_adapter
from ..checks import check_id
from ..errors import MegamemError
from ..schema import DEFAULT_NAMESPACE, check_namespace
from .files import write_json_atomic

CORTEX = "cortex"  # the store's folder for every namespace's cortex
POINTER = "current.json"  # names the live version's folder
FORMAT = "megamem-cortex"


@dataclass(frozen=True)
class Consolidated:
    """A memory the cortex holds: its id, stored text, the text its adapter recalled, metadata, when it was added."""

    id: str
    text: str
    recalled: str
    metadata: dict
    created: str


def folder(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> Path:
    """The folder of a namespace's cortex."""
    root = Path(store_path) / CORTEX
    return root if namespace == DEFAULT_NAMESPACE else root / check_namespace(namespace)


def pointer(store_path: Path, namespace: str = DEFAULT_NAMESPACE) -> Path:
    """The file that names a namespace's live cortex version (absent: it has none)."""
    return folder(store_path, namespace) / POINTER


def namespaces(store_path: Path) -> list[str]:
    """The namespaces that have a cortex in the store (the default one first)."""
    root = Path(store_path) / CORTEX
    found = [DEFAULT_NAMESPACE] if (root / POINTER).is_file() else []
    if root.is_dir():
        found += sorted(p.name for p in root.iterdir() if "-" not in p.name and (p / POINTER).is_file())
    return found


def read_cortex(
    store_path: Path, namespace: str = DEFAULT_NAMESPACE
) -> tuple[Adapter, list[Consolidated], dict] | None:
    """A namespace's cortex (its adapter checked against the recorded checksum), its memories and record; None
    when it has none."""
    where = pointer(store_path, namespace)
    if not where.is_file():
        return None
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        version = where.parent / check_id(record["version"], "cortex version")
        adapter = load_adapter(version, checksum=record["adapter_sha256"])
        memories = [Consolidated(**m) for m in record["memories"]]
    except (OSError, ValueError, KeyError, TypeError, MegamemError) as exc:
        raise MegamemError(f"the store's cortex ({where}) is damaged: {exc}") from None
    return adapter, memories, record


def write_cortex(
    store_path: Path,
    adapter: Adapter,
    memories: list[Consolidated],
    config: dict,
    base_model: str,
    namespace: str = DEFAULT_NAMESPACE,
) -> dict:
    """Write a new version of a namespace's cortex beside the old one, then switch its current.json to it (the
    commit), then remove the old version. config: how it was trained (kept in the record)."""
    root = folder(store_path, namespace)
    root.mkdir(parents=True, exist_ok=True)
    old = json.loads((root / POINTER).read_text(encoding="utf-8"))["version"] if (root / POINTER).is_file() else None
    version = f"v{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:8]}"
    save_adapter(adapter, root / version, base_model, torch.bfloat16)
    record = {
        "format": FORMAT,
        "version": version,
        "namespace": namespace,
        "adapter_sha256": file_sha256(root / version / "adapter_model.safetensors"),
        "config": config,
        "memories": [asdict(m) for m in memories],
    }
    write_json_atomic(root / POINTER, record)
    if old and old != version:
        shutil.rmtree(root / old, ignore_errors=True)
    return record
