"""The answer pipeline: how a question, or a conversation ending in one, becomes prompt turns and a mixture.

Every interface answers through here: Memory.ask, the server's chat (batched, streamed or not), the bench's
gated methods and the MemoryLLM store. What differs between them is only the decoder that turns one step
(its turns, its mixture, its token cap) into text: the library's greedy decoding (generate.decode), the
server's engine, the bench's batched generate, the MemoryLLM pool.

The modes (the paper's three from the adapters alone, then the two with the stored text, then a plain chat):

    qa        the question and the one-sentence suffix; the gated adapters at their weights
    recall    "reconstruct the story" for the question; the answer is the recall
    irag      recall, then the QA prompt with that recall in the conversation; one gate serves both turns
    rag       the heaviest gated memory's text in context, no adapter
    mega+rag  that text in context and the adapters at MEGA_RAG_SCALE of their weights (the default)
    mega      the conversation as given, the adapters at their weights

The caller's cortex (megamem.consolidate), if any, is mixed at weight 1 in every mode ("always").

    >>> mix = mixture("qa", [], [])
    >>> step = next(plan("Who founded Acme?", "qa", mix))
    >>> step.turns
    [('user', 'Who founded Acme? Answer should be no more than one sentence.')]

Limits: only the conversation's last user turn is rewritten; the turns before and after it are kept as given.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from .checks import check_count
from .errors import MegamemError

Turn = tuple[str, str]  # (role, text)

MODES = ("qa", "recall", "irag", "rag", "mega+rag", "mega")
DEFAULT_MODE = "mega+rag"  # the best answers on held-out data (docs/results.md); "qa" is the paper's QA mode
CONTEXT_MODES = ("rag", "mega+rag")  # the modes that put the heaviest gated memory's text in context
RECALL_SUFFIX = " Reconstruct the entire story that is related to the above question."
QA_SUFFIX = " Answer should be no more than one sentence."
# mega+rag mixes the adapters at this share of their gate weights: at full weight they pull the answer towards
# reciting the passage's opening, which the text in context already gives; at 0.3 the context leads and the
# adapters help (wiki partitions 0-1, 300 questions: docs/results.md, "QA against plain RAG")
MEGA_RAG_SCALE = 0.3
# a mixture term below this weight is dropped: its effect is below greedy decoding's resolution
# (docs/performance.md, "min weight"); one rule for every interface, so they decode the same tokens
MIN_WEIGHT = 1e-3
# what the question in a context mode ends with: "" (the chat-shaped prompt: the question as asked) or QA_SUFFIX
# (the paper's QA prompt). Chosen on held-out wiki partition 6 (docs/results.md, "The context prompt"): the QA
# prompt 0.627 against 0.567 on the judge, both holding the gold answer as often (0.673, 0.680)
CONTEXT_SUFFIX = QA_SUFFIX
ANSWER_TOKENS = 64  # an answer turn's default cap
RECALL_TOKENS = 256  # a recall turn's default cap


def recall_prompt(question: str) -> str:
    return question + RECALL_SUFFIX


def qa_prompt(question: str) -> str:
    return question + QA_SUFFIX


def with_context(prompt: str, passages: list[str]) -> str:
    """A RAG user turn: the passages, then the question prompt (the bench's RAG baseline and the rag modes)."""
    ctx = "\n\n".join(passages)
    return f"Context:\n{ctx}\n\n{prompt}"


def context_prompt(question: str, passages: list[str] | None) -> str:
    """The user turn of a context mode (rag, mega+rag): the passages, then the question (CONTEXT_SUFFIX)."""
    prompt = question + CONTEXT_SUFFIX
    return with_context(prompt, passages) if passages else prompt


def last_user(turns: list[Turn]) -> int | None:
    """The index of a conversation's last user turn: the question a plan rewrites and the gate routes on (routing
    on the whole conversation would keep an old topic's memory in every later answer); None when it has none."""
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    return users[-1] if users else None


def question_of(turns: list[Turn]) -> str:
    """The question a conversation asks: its last user turn, stripped ("" when it has none)."""
    u = last_user(turns)
    return turns[u][1].strip() if u is not None else ""


def check_mode(mode: str) -> str:
    """One of MODES, or an error naming them."""
    if mode not in MODES:
        raise MegamemError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


@dataclass(frozen=True)
class Mixture:
    """The adapters mixed into the model for one answer and their weights (the same length)."""

    adapters: tuple = ()
    weights: tuple[float, ...] = ()


def mixture(
    mode: str, adapters: Sequence, weights: Sequence[float], always: Sequence = (), min_weight: float = MIN_WEIGHT
) -> Mixture:
    """The mixture a mode answers with: the `always` adapters (a cortex) at weight 1, then the gated ones at
    their weights (none in rag; times MEGA_RAG_SCALE in mega+rag), terms under `min_weight` dropped."""
    scale = MEGA_RAG_SCALE if mode == "mega+rag" else 1.0
    gated = [] if mode == "rag" else [(a, w * scale) for a, w in zip(adapters, weights, strict=True)]
    terms = [(a, 1.0) for a in always] + [(a, w) for a, w in gated if w >= min_weight]
    return Mixture(tuple(a for a, _ in terms), tuple(w for _, w in terms))


def context(mode: str, texts: Sequence[str]) -> list[str] | None:
    """The passages a mode puts in context, from the gated memories' texts (heaviest first): the heaviest one's
    in rag and mega+rag (on wiki partitions 0-1 mega+rag with it answered 0.468 of 77 questions, with every
    gated memory's text 0.390: docs/results.md), none otherwise."""
    return [texts[0]] if mode in CONTEXT_MODES and texts else None


@dataclass(frozen=True)
class Gated:
    """The gate's part of one answer: (memory id, score, weight) of each routed memory, heaviest first; the
    mixture to answer with; the passages in context (see `context`)."""

    routed: list[tuple[str, float, float]]
    mixture: Mixture
    passages: list[str] | None


@dataclass(frozen=True)
class Step:
    """One decode: the conversation to continue, the mixture to continue it with, and the token cap. The last
    step's text is the answer; an earlier step's (irag's recall) feeds the next step."""

    turns: list[Turn]
    mixture: Mixture
    max_tokens: int
    final: bool


@dataclass(frozen=True)
class Reply:
    """What a plan answered: the text, and the recall it answered from (recall and irag; else None)."""

    text: str
    recall: str | None = None


def plan(
    conversation: str | list[Turn],
    mode: str,
    mix: Mixture,
    passages: list[str] | None = None,
    max_new_tokens: int | None = None,
) -> Generator[Step, str, Reply]:
    """The steps that answer `conversation` (a question, or turns whose last user turn asks it) in `mode`.

    A generator: it yields a Step, is sent that step's decoded text, and returns the Reply (see `run`).
    passages: the context of rag and mega+rag (`context`); max_new_tokens caps every step (default:
    ANSWER_TOKENS for an answer, RECALL_TOKENS for a recall)."""
    check_mode(mode)
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max new tokens")
    answer_cap = max_new_tokens or ANSWER_TOKENS
    recall_cap = max_new_tokens or RECALL_TOKENS
    turns = [("user", conversation)] if isinstance(conversation, str) else list(conversation)
    u = last_user(turns)
    if u is None or mode == "mega":  # nothing to rewrite: the conversation as given
        return Reply((yield Step(turns, mix, answer_cap, True)))
    before, after, question = turns[:u], turns[u + 1 :], question_of(turns)

    def asking(*asks: Turn) -> list[Turn]:
        return [*before, *asks, *after]

    if mode == "qa":
        return Reply((yield Step(asking(("user", qa_prompt(question))), mix, answer_cap, True)))
    if mode in CONTEXT_MODES:
        prompt = context_prompt(question, passages)
        return Reply((yield Step(asking(("user", prompt)), mix, answer_cap, True)))
    recall_turn = ("user", recall_prompt(question))
    recall = yield Step(asking(recall_turn), mix, recall_cap, mode == "recall")
    if mode == "recall":
        return Reply(recall, recall)
    answer = yield Step(
        asking(recall_turn, ("assistant", recall), ("user", qa_prompt(question))), mix, answer_cap, True
    )
    return Reply(answer, recall)


def run(steps: Generator[Step, str, Reply], decode: Callable[[Step], str]) -> Reply:
    """Drive a plan to its reply with a decoder (step -> text).

    >>> run(plan("Hi?", "qa", Mixture()), lambda step: "Hello.")
    Reply(text='Hello.', recall=None)
    """
    step = next(steps)
    while True:
        try:
            step = steps.send(decode(step))
        except StopIteration as done:
            return done.value
