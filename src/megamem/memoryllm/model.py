"""MemoryLLM on a Llama-style Hugging Face model: write text into a latent pool, read through it.

Shapes: L layers, d hidden size, K new tokens per update, n pool tokens, B batch, T text length, h KV heads,
hs head size. The base weights never change; what is trained (the "memory-use parameters") is small:

- `start` (L, d): a per-layer first token in front of every pool, the attention sink the model expects at 0;
- `new_memory` (L, K, d): added to the K writing positions at every layer's input while writing;
- a LoRA on the attention projections of every layer but the last, switched on only while writing.

Reading is the base model with the pool in front as a prefix: at layer l every input token attends to keys
and values made from [start_l, M_l] by layer l's own norm and k / v projections (positions 0..n, inputs after,
queries only for the inputs), which is exactly a KV cache. So an empty pool is the base model, the prefix is
computed once per pool version, and decoding costs what a prefix of n tokens costs.

Writing a text (the self-update): at layer l the input is [start_l, the newest K pool tokens, the text], causal;
the layer inputs at the text's last K positions (plus `new_memory`) are the K new tokens of layer l, and the
text's outputs go on to layer l + 1. The paper keeps the outputs at those positions; we keep the inputs, the
level at which layer l reads its pool, so that an untrained write of a text of at most K tokens stores the
very vectors the base model would have had with that text in its prompt. Texts shorter than K are left-padded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.models.llama.modeling_llama import rotate_half

from ..errors import MegamemError
from .pool import Pool

ADAPTER = "memoryllm"
PARAMS_FORMAT = "megamem-memoryllm-params/1"


@dataclass(frozen=True)
class MemoryConfig:
    """The mechanism's sizes (the defaults the issue starts from for SmolLM2-135M: K = 64, N = 50 K)."""

    new_tokens: int = 64  # K: tokens written per update (and dropped from the pool)
    blocks: int = 50  # N = blocks * K pool tokens per layer
    rank: int = 16  # the write LoRA
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def size(self) -> int:
        return self.new_tokens * self.blocks

    def to_meta(self) -> dict[str, str]:
        return {"new_tokens": str(self.new_tokens), "blocks": str(self.blocks), "rank": str(self.rank),
                "alpha": str(self.alpha), "targets": ",".join(self.targets)}  # fmt: skip

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> MemoryConfig:
        return cls(new_tokens=int(meta["new_tokens"]), blocks=int(meta["blocks"]), rank=int(meta["rank"]),
                   alpha=float(meta["alpha"]), targets=tuple(meta["targets"].split(",")))  # fmt: skip


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, n, n) additive mask: 0 on and below the diagonal, -inf above (explicit, whatever the attention)."""
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)[None, None]


class MemoryLLM(nn.Module):
    """A base model plus MemoryLLM's memory-use parameters; the pool itself is a separate `Pool` value.

    >>> mllm = MemoryLLM(model, tok)              # doctest: +SKIP
    >>> pool = mllm.inject(Pool.empty(), "Ada Lovelace wrote the first program.")  # doctest: +SKIP
    >>> mllm.answer(pool, [[("user", "Who wrote the first program?")]], 16)  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: MemoryConfig | None = None):
        super().__init__()
        self.model, self.tok, self.cfg = model, tok, cfg or MemoryConfig()
        c = model.config
        self.n_layers, self.d = c.num_hidden_layers, c.hidden_size
        self.n_kv, self.hs = (
            c.num_key_value_heads,
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        )
        for p in model.parameters():
            p.requires_grad_(False)
        # the first token of the model's own prompts, layer by layer: what attention expects at position 0
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            first = self.layer_inputs(torch.tensor([[bos]]))[:, 0, 0]  # (L, d)
        self.start = nn.Parameter(first.clone())
        self.new_memory = nn.Parameter(torch.zeros(self.n_layers, self.cfg.new_tokens, self.d))
        # every layer but the last: a write keeps each layer's inputs, so the last layer's outputs are never used
        lora = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=0.0,
            target_modules=list(self.cfg.targets),
            layers_to_transform=list(range(self.n_layers - 1)),
        )
        with torch.random.fork_rng():  # the LoRA's random A matrices: the same for every run (resumes compare equal)
            torch.manual_seed(0)
            inject_adapter_in_model(lora, model, adapter_name=ADAPTER)
        self._lora = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._adapters(False)
        self.filler = tok.encode("\n")[0]  # what left-pads a text shorter than K
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._prefix_cache: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    # -- building blocks -----------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def rope(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, n, hs) for positions 0..n-1."""
        return self.model.model.rotary_emb(x, torch.arange(n, device=x.device)[None])

    def run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One decoder layer over (B, S, d) at positions 0..S-1, causal."""
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)[None]
        return layer(x, attention_mask=causal_mask(n, x.dtype), position_ids=pos, position_embeddings=self.rope(x, n))

    def layer_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """(L, B, T, d): what each layer of the base model receives for `ids` (B, T): the debug oracle's pool."""
        h = self.model.model.embed_tokens(ids)
        out = []
        for layer in self.layers:
            out.append(h)
            h = self.run_layer(layer, h)
        return torch.stack(out)

    def _adapters(self, on: bool) -> None:
        """The write LoRA on (writing) or off (reading, and everything else the model does)."""
        for m in self._lora:
            m.enable_adapters(on)
        # PEFT also clears requires_grad when it switches adapters off, which would drop the gradients of a write
        # made just before (autograd checks the flag at backward time); unused while off, so they keep it on
        for p in self.lora_params():
            p.requires_grad_(True)

    # -- writing -------------------------------------------------------------------------------------

    def pad_ids(self, ids: list[int]) -> list[int]:
        """A text's ids left-padded to at least K tokens (the K writing positions are its last K)."""
        return [self.filler] * max(0, self.cfg.new_tokens - len(ids)) + ids

    def write(self, memory: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """(L, B, K, d) new pool tokens for texts `ids` (B, T >= K), after the newest K of `memory` (L, B, n, d)."""
        B, T = ids.shape
        K = self.cfg.new_tokens
        if T < K:
            raise MegamemError(f"a written text needs at least {K} tokens (pad_ids pads it); got {T}")
        self._adapters(True)
        try:
            h = self.model.model.embed_tokens(ids)  # (B, T, d)
            new = []
            for li, layer in enumerate(self.layers):
                parts = [self.start[li].expand(B, 1, self.d)]
                if memory is not None:
                    parts.append(memory[li, :, -K:].to(h.dtype))
                x = torch.cat(parts + [h], dim=1)  # (B, 1 [+ K] + T, d)
                x = x + F.pad(self.new_memory[li], (0, 0, x.shape[1] - K, 0))  # marks the writing positions
                new.append(x[:, -K:])
                h = self.run_layer(layer, x)[:, -T:]
            return torch.stack(new)
        finally:
            self._adapters(False)

    def text_ids(self, text: str) -> list[int]:
        return self.pad_ids(self.tok(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def inject(self, pool: Pool, text: str) -> Pool:
        """The pool after writing `text` (one update of K tokens; a long text is cut into K..4K-token pieces)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        piece = 4 * self.cfg.new_tokens
        for i in range(0, max(len(ids), 1), piece):
            chunk = torch.tensor([self.pad_ids(ids[i : i + piece])])
            memory = None if pool.is_empty else pool.memory[:, None].float()
            pool = pool.updated(self.write(memory, chunk)[:, 0], self.cfg.size)
        return pool

    # -- reading -------------------------------------------------------------------------------------

    def prefix_kv(
        self, memory: torch.Tensor, start: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (B, h, 1 + n, hs): the pool [start_l, M_l] (L, B, n, d) as a KV cache."""
        L, B, n, _ = memory.shape
        start = self.start[:, None, None].expand(L, B, 1, self.d) if start is None else start  # (L, B, 1, d)
        out = []
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(torch.cat([start[li].to(memory.dtype), memory[li]], dim=1).float())
            att = layer.self_attn
            k = att.k_proj(x).view(B, 1 + n, self.n_kv, self.hs).transpose(1, 2)  # (B, h, 1 + n, hs)
            v = att.v_proj(x).view(B, 1 + n, self.n_kv, self.hs).transpose(1, 2)
            cos, sin = self.rope(x, 1 + n)
            k = k * cos[:, None] + rotate_half(k) * sin[:, None]
            out.append((k, v))
        return out

    def _pool_kv(self, pool: Pool, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pool's prefix, computed once per pool version and expanded (not copied) to the batch."""
        # keyed by the memory tensor itself (a pool never changes it in place), held so that its id cannot be
        # reused by a later pool's tensor while the entry stands
        if self._prefix_cache is None or self._prefix_cache[0] is not pool.memory:
            with torch.no_grad():
                self._prefix_cache = (pool.memory, self.prefix_kv(pool.memory[:, None].float()))
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._prefix_cache[1]]

    def forward_read(
        self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T, V) of `ids` (B, T, left-padded by `mask`) after the prefix `kv` (None: no pool)."""
        B = ids.shape[0]
        P = 0 if kv is None else kv[0][0].shape[2]
        cache = DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache()
        full = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
        pos = P + (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True, **{self._cache_kw: cache}
        )
        return out.logits

    @torch.no_grad()
    def generate(self, pool: Pool, prompts: list[list[int]], max_new: int) -> list[str]:
        """Greedy answers to token-id prompts, all reading `pool` (the base model where the pool is empty).

        The pool's prefix goes into a static cache sized for the whole answer: a growing cache would copy every
        pool key at every step (on CPU that was 60% of the decoding time at N = 3,200).
        """
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.tensor([[self.filler] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        kv = [] if pool.is_empty else self._pool_kv(pool, B)
        P = kv[0][0].shape[2] if kv else 0
        cache = StaticCache(config=self.model.config, max_cache_len=P + T + max_new)
        for li, (k, v) in enumerate(kv):
            cache.update(k, v, li)
        full = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask, torch.zeros(B, max_new, dtype=mask.dtype)], 1)
        pos = P + (mask.cumsum(-1) - 1).clamp(min=0)
        stops = {t for t in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}
        out, done = [[] for _ in range(B)], [False] * B
        step_ids, filled = ids, P + T
        for _ in range(max_new):
            res = self.model(input_ids=step_ids, attention_mask=full, position_ids=pos, use_cache=True,
                             **{self._cache_kw: cache})  # fmt: skip
            nxt = res.logits[:, -1].argmax(-1)
            for b in range(B):
                if not done[b]:
                    if int(nxt[b]) in stops:
                        done[b] = True
                    else:
                        out[b].append(int(nxt[b]))
            if all(done):
                break
            full[:, filled] = 1
            filled += 1
            step_ids, pos = nxt[:, None], pos[:, -1:] + 1
        return [self.tok.decode(o, skip_special_tokens=True).strip() for o in out]

    def answer(self, pool: Pool, conversations: list[list[tuple[str, str]]], max_new: int) -> list[str]:
        """Greedy replies to chat conversations [(role, text), ...] through the pool."""
        from ..model import chat_ids

        return self.generate(pool, [chat_ids(self.tok, c, generation_prompt=True) for c in conversations], max_new)

    # -- the trained parameters ----------------------------------------------------------------------

    def lora_params(self) -> list[nn.Parameter]:
        return [p for m in self._lora for n, p in m.named_parameters() if "lora_" in n]

    def trainable(self) -> list[nn.Parameter]:
        return [self.start, self.new_memory, *self.lora_params()]

    def save_params(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """The memory-use parameters (LoRA, start, new-memory embedding) as one bf16 safetensors file."""
        tensors = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.model, adapter_name=ADAPTER).items()}
        tensors |= {"start": self.start.detach(), "new_memory": self.new_memory.detach()}
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        meta = {"format": PARAMS_FORMAT, "model_type": self.model.config.model_type, **self.cfg.to_meta()}
        save_file(tensors, str(path), metadata={**meta, **(extra or {})})

    def load_params(self, path: Path) -> None:
        """Load save_params' file (its config must match this module's); an error naming the file if it cannot."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise MegamemError(f"{path} is not a readable MemoryLLM parameter file ({exc})") from None
        if meta.get("format") != PARAMS_FORMAT:
            raise MegamemError(f"{path} is not a megamem MemoryLLM parameter file")
        try:
            cfg = MemoryConfig.from_meta(meta)
            tensors = load_file(str(path))
            start, new_memory = tensors["start"].float(), tensors["new_memory"].float()
        except Exception as exc:  # a header that parses but does not describe the data, or a missing tensor
            raise MegamemError(f"{path} is not a readable MemoryLLM parameter file ({exc!r})") from None
        if cfg != self.cfg:
            raise MegamemError(f"{path} was trained with {cfg}, not {self.cfg}")
        with torch.no_grad():
            self.start.copy_(start)
            self.new_memory.copy_(new_memory)
        lora = {k.removeprefix("lora."): v.float() for k, v in tensors.items() if k.startswith("lora.")}
        set_peft_model_state_dict(self.model, lora, adapter_name=ADAPTER)
        self._adapters(False)
        self._prefix_cache = None  # computed with the old start vectors
