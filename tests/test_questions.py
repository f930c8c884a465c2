"""Cloze questions made from a memory's sentences, and the QA-format and distillation examples built on them."""

import torch

from megamem.answer import QA_SUFFIX, qa_prompt, with_context
from megamem.inject import clear, inject
from megamem.questions import cloze, questions, sentences
from megamem.train import Example, Recipe, collate, examples, lm_loss, make_example

PASSAGE = (
    "Ann Lee (born 4 May 1990) is a Welsh chemist. She won the Davy Medal in 2021 for work on catalysts. "
    "her lab is small."
)


def test_sentences_split_at_stops_before_a_capital_or_digit():
    assert sentences(PASSAGE) == [
        "Ann Lee (born 4 May 1990) is a Welsh chemist.",
        "She won the Davy Medal in 2021 for work on catalysts. her lab is small.",
    ]


def test_a_cloze_question_lacks_exactly_one_span_of_its_sentence():
    s = "She won the Davy Medal in 2021 for work on catalysts."
    asked = {cloze(s, seed) for seed in range(20)}
    assert asked == {
        "She won the what in 2021 for work on catalysts?",
        "She won the Davy Medal in when for work on catalysts?",
    }  # "She" alone is a sentence start, not a name to ask for
    assert cloze("nothing to ask here.", 0) is None
    assert cloze(s, 3) == cloze(s, 3)  # seeded


def test_questions_cover_every_sentence_with_distinct_questions():
    pairs = questions(["Ann Lee (born 4 May 1990) is a Welsh chemist.", "In 2021 Lee won the Davy Medal."], 2)
    by_answer = {}
    for q, a, span in pairs:
        assert span in a and span not in q
        by_answer.setdefault(a, []).append(q)
    assert list(by_answer) == ["Ann Lee (born 4 May 1990) is a Welsh chemist.", "In 2021 Lee won the Davy Medal."]
    assert all(len(qs) == 2 and len(set(qs)) == 2 for qs in by_answer.values())


def test_a_questions_recipe_adds_qa_format_turns_answered_by_one_sentence(tok):
    plain = examples(tok, [PASSAGE], Recipe())
    asked = examples(tok, [PASSAGE], Recipe(questions=1))
    assert asked[: len(plain)] == plain and len(asked) > len(plain)
    for ex in asked[len(plain) :]:
        prompt = tok.decode([t for t, y in zip(ex.ids, ex.labels, strict=True) if y == -100])
        answer = tok.decode([t for t in ex.labels if t != -100])
        assert QA_SUFFIX.strip() in prompt
        assert any(s in answer for s in sentences(PASSAGE)) and PASSAGE not in answer


def test_soft_targets_equal_to_the_labels_double_the_loss(tiny):
    """A teacher whose top token is the label with probability 1 adds exactly the cross-entropy once more:
    the soft targets sit on the labelled positions, shifted like the labels."""
    model, tok = tiny
    ex = make_example(tok, "The heron Zorblatt lives on Quillon pier.")
    answer = torch.tensor([t for t in ex.labels if t != -100])
    hard = Example(ex.ids, ex.labels, (answer[:, None], torch.ones(len(answer), 1)))
    batch = collate([hard, make_example(tok, "Another row with no teacher.")], tok.pad_token_id)
    with torch.no_grad():
        alone = collate([ex], tok.pad_token_id)
        one = lm_loss(model, alone, reduction="none").sum()
        rows = lm_loss(model, batch, reduction="none", distill=1.0)
        plain = lm_loss(model, batch, reduction="none")
    assert torch.allclose(rows[0].sum(), 2 * one, atol=1e-4)
    assert torch.allclose(rows[1], plain[1])  # a row with no teacher: cross-entropy only


def test_distillation_targets_are_the_teachers_next_tokens_with_the_passage_in_context(tiny):
    model, tok = tiny
    inject(model, ["up_proj", "down_proj"])
    clear(model)
    recipe = Recipe(distill=1.0, distill_top=4, questions=1)
    exs = examples(tok, [PASSAGE], recipe, model)
    assert all(ex.soft is not None for ex in exs)
    ex = exs[-1]  # a QA-format turn: the teacher read the passage, then the question
    idx, p = ex.soft
    n = sum(y != -100 for y in ex.labels)
    assert idx.shape == p.shape == (n, 4) and torch.allclose(p.sum(-1), torch.ones(n))
    # the top token at each answer position is the model's argmax after the passage-in-context prompt
    q, a, _ = questions([PASSAGE], 1, recipe.seed)[-1]
    seen = make_example(tok, a, with_context(qa_prompt(q), [PASSAGE]))
    assert seen.ids[-n:] == ex.ids[-n:]
    with torch.no_grad():
        teacher = model(input_ids=torch.tensor([seen.ids])).logits[0, -n - 1 : -1]
        student = model(input_ids=torch.tensor([ex.ids])).logits[0, -n - 1 : -1]
    assert torch.equal(idx[:, 0], teacher.argmax(-1))
    assert not torch.allclose(teacher, student)  # the passage in context is what the targets carry


def test_a_span_recipe_answers_with_what_the_question_asks_for(tok):
    asked = examples(tok, [PASSAGE], Recipe(questions=1, answers="span"))[1:]
    spans = {q: span for q, _, span in questions([PASSAGE], 1)}
    assert len(asked) == len(spans)
    for ex, span in zip(asked, spans.values(), strict=True):
        assert tok.decode([t for t in ex.labels if t != -100]).startswith(f"{span}.")
