"""Extractive summaries against bert-extractive-summarizer 0.10.1 (run under transformers 4.57.6 from the
side directory), on the real MiniLM and a tiny checkpoint, and the sentence rows across batches.

About exactness: bertq embeds sentences in padded batches, the reference one at a time, and the two
embeddings differ by about 1e-6. k-means then decides the same, except where a decision sits within
that rounding of a tie; a cluster of exactly two sentences is one by construction (its centroid is
halfway). There the reference picks by rounding and bertq picks the earlier sentence (``TIE``). Every
parity case below first shows that it is not such a case: with the reference's arithmetic (no tie
rule), its choice holds under noise of 1e-6 on the embeddings."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertq.schemas import Limits, SummarizeResult, TaskName, validate_items, validate_options
from bertq.tasks import get_task
from bertq.tasks import summarize as summarize_task
from bertq.tasks.summarize import choose, nearest_to_centroids
from bertq.workers.backends.models import load_model
from bertq.workers.runner import preprocess_items, run_items

from bench.peers.extractive_summarizer import summarize
from bench.texts import review_document
from bertq.errors import BertqError
from tests.counting import CountingTask

KETTLE = (
    "I bought this kettle in March after my old one started leaking from the base. "
    "It boils a full litre in a little under three minutes, which is noticeably faster than before. "
    "The handle stays cool, although the lid hinge feels flimsy and rattles when the water is boiling. "
    "After two months of daily use there is already some limescale around the spout, so I descale it every few weeks. "
    "Customer service replaced the lid within a week when the hinge finally snapped. "
    "Overall it is a decent kettle for the price, but I would not call it durable."
)
# two sentences, fewer than any num_sentences below
HEADPHONES = (
    "Great headphones for the gym, they never fall out of my ears. "
    "The battery lasts about a week of workouts between charges."
)
STAND = (
    "Short version: it works.   Longer version below.\n\n"
    "The aluminium laptop stand arrived in a crushed box, yet the stand itself was intact and well packed inside. "
    "Assembly took five minutes and needed only the included hex key. "
    "At its highest setting my 15-inch laptop sits at eye level, which has made a real difference to my neck pain. "
    "It wobbles slightly when I type hard on the built-in keyboard, so I now use an external one. "
    "The rubber pads keep it from sliding on my glass desk. "
    "Cable management is an afterthought: there is no clip or channel at all. "
    "For the money I expected a little more polish, but it does the one job it promises. "
    "Would I buy it again? Probably yes, if it were on sale. "
    "My colleague ordered the same model and hers came with a bent arm, so quality control seems uneven. "
    "Sellers answered her complaint quickly and sent a replacement arm. 👍"
)
# 35 sentences, 667 WordPiece tokens: longer than any model window
ARTICLE = " ".join(
    [
        "The city council met on Tuesday evening to debate the future of the old tram depot on the river bank.",
        "Built in 1898, the depot housed the first electric trams of the region and later served as a bus garage.",
        "It has stood empty since 2009, when the transport company moved to a larger site in the industrial zone.",
        "Three proposals were on the table: a housing project, a covered market and a museum of local transport.",
        "The housing project, backed by a private developer, would add two hundred flats, a third of them affordable.",
        "Critics argued that the flats would block the river view that residents of the old town "
        "have enjoyed for a century.",
        "The market proposal came from a cooperative of farmers who sell at the weekly open-air market on the square.",
        "They want a roof over their stalls so that trade can continue through the winter months.",
        "The museum plan was presented by a volunteer association that has restored four historic trams "
        "over twenty years.",
        "Its chairwoman said the trams are currently kept in a rented shed where damp is damaging the wooden seats.",
        "Several councillors suggested combining the market and the museum in the same building.",
        "The depot's hall is large enough for both, according to a survey commissioned by the planning department.",
        "The survey also found asbestos in the roof, which must be removed whichever project is chosen.",
        "Removal alone is expected to cost around 1.2 million euros and to take at least six months.",
        "The developer offered to pay for the removal if the council grants permission for the flats.",
        "Opposition councillors called the offer a way to buy a planning decision.",
        "The mayor replied that every proposal would be judged on its merits and on its cost to taxpayers.",
        "Residents who spoke during the public session were divided almost evenly between the three options.",
        "An elderly man recalled riding the last tram out of the depot as a boy and pleaded for the museum.",
        "A young mother asked where families priced out of the city centre were supposed to live.",
        "The farmers' spokesman pointed out that the market already draws visitors from the surrounding villages.",
        "After three hours of debate, the council voted to ask for detailed cost estimates for all three plans.",
        "The estimates are due in September, and a final decision is expected before the end of the year.",
        "Until then, the depot will remain fenced off, and the asbestos survey will be published online.",
        "Local shop owners hope that any of the three projects will bring more people to the neglected river bank.",
        "Some of them have already started to repaint their storefronts in anticipation.",
        "The regional newspaper launched a poll, and in its first day more than four thousand readers took part.",
        "Early results favour the combined market and museum, followed by the housing project.",
        "The council stressed that the poll is not binding but said it would take public opinion into account.",
        "Meanwhile, the transport museum volunteers have started a fundraising campaign to move "
        "the trams to a dry shed.",
        "They have collected about fifteen thousand euros so far, roughly half of what they need.",
        "A local brewery promised to donate a share of the sales of a special beer named after the first tram line.",
        "The tram line itself closed in 1961, when buses replaced trams across most of the country.",
        "Historians note that the depot is one of only two of its kind still standing in the region.",
        "Whatever the council decides, the building's brick facade is protected and cannot be demolished.",
    ]
)
DOCUMENTS = {"kettle": KETTLE, "headphones": HEADPHONES, "stand": STAND, "article": ARTICLE}

# (model fixture, document, options). Cases whose choice hangs on a tie are left out (see the module
# docstring): with num_sentences=3 the kettle review's two-sentence cluster is one, for example.
MINILM_CASES = [
    ("minilm", "kettle", {}),  # ratio 0.2
    ("minilm", "kettle", {"ratio": 0.3, "min_length": 20}),
    ("minilm", "kettle", {"num_sentences": 2, "max_length": 100}),
    ("minilm", "headphones", {"num_sentences": 3}),  # fewer sentences than asked
    ("minilm", "stand", {}),
    ("minilm", "stand", {"num_sentences": 4, "use_first": False}),
    ("minilm", "stand", {"ratio": 0.3, "min_length": 20}),
    ("minilm", "article", {"num_sentences": 3}),  # longer than 512 tokens
    ("minilm", "article", {}),
    ("minilm", "article", {"num_sentences": 2, "max_length": 100}),
]
TINY_CASES = [
    ("tiny", "kettle", {"num_sentences": 3}),
    ("tiny", "kettle", {"num_sentences": 4, "use_first": False}),
    ("tiny", "headphones", {"num_sentences": 5}),
    ("tiny", "stand", {"num_sentences": 5}),
    ("tiny", "article", {"num_sentences": 3}),
    ("tiny", "article", {"num_sentences": 5}),
]
CASES = MINILM_CASES + TINY_CASES


@pytest.fixture(scope="module")
def models(minilm: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {"minilm": minilm, "tiny": tiny_models["base"]}


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> dict[str, Any]:
    return {name: load_model(get_task(TaskName.summarize), str(path)) for name, path in models.items()}


@pytest.fixture(scope="module")
def expected(models: dict[str, Path]) -> list[list[str]]:
    """The reference's sentences per case, in CASES order, from one subprocess."""
    runs = [
        {"model": str(models[model]), "documents": [DOCUMENTS[name]], "options": options}
        for model, name, options in CASES
    ]
    return [out["sentences"] for (out,) in summarize(runs)]


def run(
    loaded: Any, texts: list[str], options: dict[str, Any], max_tokens: int = 8192
) -> list[SummarizeResult | BertqError]:  # type: ignore[no-untyped-def]
    items = validate_items(TaskName.summarize, [{"text": text} for text in texts], Limits())
    return run_items(
        get_task(TaskName.summarize), loaded, items, validate_options(TaskName.summarize, options), max_tokens, 64
    )  # type: ignore[return-value]


def embeddings(loaded: Any, text: str, options: dict[str, Any]) -> np.ndarray:
    """The candidate sentences' embeddings as bertq computes them (rows in one padded batch)."""
    from bertq.workers.runner import forward_rows

    task = get_task(TaskName.summarize)
    items = validate_items(TaskName.summarize, [{"text": text}], Limits())
    (rows,) = preprocess_items(task, loaded, items, validate_options(TaskName.summarize, options))
    assert isinstance(rows, list)
    return np.stack(forward_rows(task, loaded, rows))


def assert_holds_under_noise(features: np.ndarray, options: dict[str, Any]) -> None:
    parsed = validate_options(TaskName.summarize, options)
    plain = choose(features, parsed)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for _ in range(10):
        noisy = features + rng.standard_normal(features.shape).astype(np.float32) * 1e-6
        assert choose(noisy, parsed) == plain, "this case's choice hangs on float rounding"  # type: ignore[arg-type]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{n}-{json.dumps(o)}" for m, n, o in CASES])
def test_same_sentences_as_bert_extractive_summarizer(
    loaded: dict[str, Any], expected: list[list[str]], case: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, name, options = CASES[case]
    text = DOCUMENTS[name]
    with monkeypatch.context() as reference_arithmetic:
        reference_arithmetic.setattr(summarize_task, "TIE", 0.0)
        assert_holds_under_noise(embeddings(loaded[model], text, options), options)
    (result,) = run(loaded[model], [text], options)
    assert isinstance(result, SummarizeResult), result
    theirs = expected[case]
    assert [sentence.text for sentence in result.sentences] == theirs
    assert result.summary == " ".join(theirs)  # the reference's return value without return_as_list


def test_sentences_carry_their_index_and_offsets_in_text_order(loaded: dict[str, Any]) -> None:
    (result,) = run(loaded["minilm"], [STAND], {"num_sentences": 4})
    assert isinstance(result, SummarizeResult)
    assert len(result.sentences) == 4
    for sentence in result.sentences:
        assert STAND[sentence.start : sentence.end] == sentence.text
        assert sentence.text == sentence.text.strip()
    assert [s.start for s in result.sentences] == sorted(s.start for s in result.sentences)
    # "Short version: it works." and "Longer version below." are sentences 0 and 1, under min_length
    assert result.sentences[0].index == 2 and result.sentences[0].text.startswith("The aluminium laptop stand")


def test_fewer_sentences_than_asked_returns_them_all(loaded: dict[str, Any]) -> None:
    for use_first in (True, False):
        (result,) = run(loaded["minilm"], [HEADPHONES], {"num_sentences": 5, "use_first": use_first})
        assert isinstance(result, SummarizeResult)
        assert [s.index for s in result.sentences] == [0, 1]
        assert result.summary == HEADPHONES


def test_ratio_sets_the_number_of_clusters(loaded: dict[str, Any]) -> None:
    # 35 candidates: the first, plus max(1, int(34 * ratio)) chosen by clustering
    for ratio, count in ((0.2, 1 + 6), (0.5, 1 + 17), (0.01, 1 + 1)):
        (result,) = run(loaded["tiny"], [ARTICLE], {"ratio": ratio})
        assert isinstance(result, SummarizeResult)
        assert len(result.sentences) == count
        assert result.sentences[0].index == 0


def test_a_sentence_longer_than_the_window_is_cut_and_says_so(loaded: dict[str, Any]) -> None:
    cjk = "東京の店で買った製品はとても良かったです" * 28 + "。"  # 561 characters, one token each: over 512
    text = f"{KETTLE} {cjk} {HEADPHONES}"
    (result,) = run(loaded["tiny"], [text], {"num_sentences": 3})
    assert isinstance(result, SummarizeResult) and result.truncated
    (plain,) = run(loaded["tiny"], [KETTLE], {"num_sentences": 3})
    assert isinstance(plain, SummarizeResult) and not plain.truncated


def test_text_without_candidate_sentences_is_an_item_error_and_spares_batch_mates(loaded: dict[str, Any]) -> None:
    short, fine = run(loaded["tiny"], ["Great. Works fine. Would buy again!", KETTLE], {"num_sentences": 3})
    assert isinstance(short, BertqError)
    assert short.field == "items[0].text"
    assert "longer than 40 and shorter than 600" in str(short) and "options.min_length" in str(short)
    assert isinstance(fine, SummarizeResult) and len(fine.sentences) == 3


def test_equally_near_sentences_go_to_the_earlier_one_whatever_the_rounding() -> None:
    rng = np.random.default_rng(4)
    far, a = rng.standard_normal((2, 16)).astype(np.float32) * 5
    near = a + rng.standard_normal(16).astype(np.float32) * 0.01
    # a two-sentence cluster: its centroid is halfway, and the earlier sentence wins either way round
    assert nearest_to_centroids(np.stack([far, a, near]), 2) == [0, 1]
    assert nearest_to_centroids(np.stack([far, near, a]), 2) == [0, 1]
    # a sentence repeated three times, one copy computed in another batch (1e-7 off): the first copy
    assert nearest_to_centroids(np.stack([far, a + 1e-7, a, a]), 2) == [0, 1]


def test_a_300_sentence_document_across_many_batches_gives_the_one_batch_summary(loaded: dict[str, Any]) -> None:
    text = review_document(random.Random(3), 300)
    options = {"num_sentences": 5}
    assert_holds_under_noise(embeddings(loaded["tiny"], text, options), options)
    items = validate_items(TaskName.summarize, [{"text": text}], Limits())
    parsed = validate_options(TaskName.summarize, options)
    one, many = CountingTask(TaskName.summarize), CountingTask(TaskName.summarize)
    (whole,) = run_items(one, loaded["tiny"], items, parsed, 1_000_000, 10_000)  # type: ignore[arg-type]
    (split,) = run_items(many, loaded["tiny"], items, parsed, 256, 64)  # type: ignore[arg-type]
    assert len(one.batches) == 1 and len(many.batches) >= 10
    assert sum(many.batches) == sum(one.batches) > 200  # distinct candidate sentences, each computed once
    assert isinstance(whole, SummarizeResult) and isinstance(split, SummarizeResult)
    assert whole == split and len(whole.sentences) == 5


def test_same_summaries_alone_and_packed_with_other_documents(loaded: dict[str, Any]) -> None:
    options = {"num_sentences": 3}
    alone = [run(loaded["minilm"], [text], options)[0] for text in DOCUMENTS.values()]
    rng = random.Random(5)
    others = [review_document(rng, n) for n in (3, 30, 8, 60, 15)]
    packed = run(loaded["minilm"], others[:2] + list(DOCUMENTS.values()) + others[2:], options, max_tokens=1024)
    assert packed[2 : 2 + len(DOCUMENTS)] == alone
