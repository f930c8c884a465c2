"""The memory pool of MemoryLLM: N latent vectors per layer, rewritten K at a time with random drops.

A pool is plain state: one tensor (L, N, d) of layer-input vectors, the number of updates made and the seed
that, with that number, fixes every drop. The drops are derived (`drop_order(seed, update, N, K)`), never
kept, so a pool saved after t updates and loaded again drops exactly what the unsaved one would have.

    >>> pool = Pool.empty(seed=0)
    >>> pool = pool.updated(torch.ones(2, 4, 8), size=16)  # the first update tiles 4 tokens to 16
    >>> pool.memory.shape, pool.updates
    (torch.Size([2, 16, 8]), 1)

Limits: one pool per store (no batch dimension here; training stacks pools itself), and a token survives
t later updates with probability (1 - K/N)^t: there is no way to forget one memory on purpose.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import MegamemError

# Pools are kept (and saved) in bf16: half the bytes of float32, and a save / load round trip is bit-exact because
# the file holds exactly the tensor in use. The arithmetic that reads them runs in float32.
POOL_DTYPE = torch.bfloat16
POOL_FORMAT = "megamem-memoryllm-pool/1"


def payload_sha256(memory: torch.Tensor | None, updates: int, seed: int) -> str:
    """The checksum save() writes into the file's metadata and load() checks: the update count, the seed, the
    tensor's dtype and shape and every byte of it (hashing a 110.6 MB pool takes about 65 ms with SHA-NI)."""
    h = hashlib.sha256(f"{updates}\n{seed}\n".encode())
    if memory is not None:
        h.update(f"{memory.dtype}\n{tuple(memory.shape)}\n".encode())
        h.update(memory.detach().contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def drop_order(seed: int, update: int, size: int, new: int) -> torch.Tensor:
    """The indices (sorted, so order is kept) of the size - new old tokens that survive update number `update`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + update)
    keep = torch.randperm(size, generator=g)[: size - new]
    return keep.sort().values


def advance(memory: torch.Tensor | None, new: torch.Tensor, size: int, seed: int, update: int) -> torch.Tensor:
    """The pool's tokens after update number `update` writes `new` (..., K, d), along dim -2 (any leading dims,
    gradients kept: training uses it too). The first update (memory None) tiles `new` over all `size` tokens,
    as the paper does, so a fresh pool reads like one that has seen the text many times; a later one keeps
    drop_order's survivors, in order, and appends `new`."""
    n_new = new.shape[-2]
    if size % n_new:
        raise MegamemError(f"pool size {size} is not a multiple of the {n_new} tokens of one update")
    if memory is None:
        return new.repeat(*[1] * (new.dim() - 2), size // n_new, 1)
    keep = drop_order(seed, update, memory.shape[-2], n_new)
    return torch.cat([memory[..., keep, :], new], dim=-2)


@dataclass(frozen=True)
class Pool:
    """A MemoryLLM pool: `memory` (L, N, d) or None while empty, `updates` made so far, the drop `seed`."""

    memory: torch.Tensor | None
    updates: int = 0
    seed: int = 0

    @classmethod
    def empty(cls, seed: int = 0) -> Pool:
        return cls(memory=None, updates=0, seed=seed)

    @property
    def is_empty(self) -> bool:
        return self.memory is None

    def updated(self, new: torch.Tensor, size: int) -> Pool:
        """The pool after writing `new` (L, K, d) (see advance: the first update tiles, later ones drop K)."""
        old = None if self.memory is None else self.memory.to(POOL_DTYPE)
        memory = advance(old, new.detach().to(POOL_DTYPE), size, self.seed, self.updates)
        return Pool(memory=memory, updates=self.updates + 1, seed=self.seed)

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """Write the pool as one safetensors file, its memory exactly as held (bf16 after any update), with the
        checksum load() checks; `extra` goes into the file's metadata (a store keeps its list of memories there:
        one file, one commit)."""
        meta = {**(extra or {}), "updates": str(self.updates), "seed": str(self.seed), "format": POOL_FORMAT}
        meta["sha256"] = payload_sha256(self.memory, self.updates, self.seed)
        tensors = {} if self.memory is None else {"memory": self.memory.contiguous()}
        save_file(tensors, str(path), metadata=meta)

    @staticmethod
    def metadata(path: Path) -> dict[str, str]:
        """The file's metadata (only its header is read); an error unless save() wrote it."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise MegamemError(f"{path} is not a readable MemoryLLM pool file ({exc})") from None
        if meta.get("format") != POOL_FORMAT:
            raise MegamemError(f"{path} is not a megamem MemoryLLM pool file")
        return meta

    @classmethod
    def load(cls, path: Path) -> Pool:
        """Read a pool written by save(), bit for bit; an error naming the file if it fails its checksum (a pool
        saved before checksums were written has none to check)."""
        meta = cls.metadata(path)
        try:
            memory = load_file(str(path)).get("memory")
            updates, seed = int(meta["updates"]), int(meta["seed"])
        except Exception as exc:  # a header that parses but does not describe the data, or a bad number
            raise MegamemError(f"{path} is not a readable MemoryLLM pool file ({exc})") from None
        want = meta.get("sha256")
        if want is not None and payload_sha256(memory, updates, seed) != want:
            raise MegamemError(f"{path} is damaged: its pool fails its checksum")
        return cls(memory=memory, updates=updates, seed=seed)

    def describe(self) -> str:
        shape = "empty" if self.memory is None else "x".join(map(str, self.memory.shape))
        return json.dumps({"updates": self.updates, "seed": self.seed, "memory": shape})
