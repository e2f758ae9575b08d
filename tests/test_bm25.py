import pytest

from tracerl.tools.bm25 import BM25Search

DOCS = [
    {"id": "d0", "title": "Velora", "text": "Velora is a city in Tarsland. Its mayor is Dren Holloway."},
    {"id": "d1", "title": "Dren Holloway", "text": "Dren Holloway is a painter born in Velora."},
    {"id": "d2", "title": "Tarsland", "text": "Tarsland is a country whose capital is Velora."},
    {"id": "d3", "title": "Ostrel Group", "text": "Ostrel Group is a shipping firm founded by Dren Holloway."},
    {"id": "d4", "title": "Kesh", "text": "Kesh is a city in Tarsland with many painters."},
]


@pytest.fixture(scope="module")
def search():
    return BM25Search(DOCS, top_k=3)


def test_own_page_ranks_first(search):
    assert search.search("Velora")[0]["id"] == "d0"
    assert search.search("Dren Holloway")[0]["id"] == "d1"
    assert search.search("Ostrel Group")[0]["id"] == "d3"


def test_result_fields_and_order(search):
    hits = search.search("Velora")
    assert len(hits) == 3
    assert set(hits[0]) == {"id", "title", "text", "score"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_stemming_matches_inflections(search):
    # "painters" (query, d4) and "painter" (d1) share one stem.
    ids = {h["id"] for h in search.search("Painters", k=5)}
    assert ids == {"d1", "d4"}


def test_k_override_and_limits(search):
    assert len(search.search("Velora", k=1)) == 1
    assert len(search.search("Velora", k=10)) == 3  # only documents that share a term
    assert search.search("Velora", k=0) == []


@pytest.mark.parametrize("query", ["", "   ", "the of and", "zzzunknown", "!!!"])
def test_queries_without_known_terms_return_nothing(search, query):
    assert search.search(query) == []


def test_batch_equals_single(search):
    queries = ["Velora", "", "Dren Holloway", "Tarsland city"]
    assert search.search_batch(queries) == [search.search(q) for q in queries]
    assert search.search_batch([]) == []


def test_deterministic_tie_breaking():
    docs = [{"id": str(i), "title": "same", "text": "identical words here"} for i in range(6)]
    s = BM25Search(docs, top_k=4)
    assert [h["id"] for h in s.search("identical")] == ["0", "1", "2", "3"]
    assert BM25Search(docs, top_k=4).search("identical") == s.search("identical")


def test_empty_corpus():
    assert BM25Search([]).search("anything") == []


def test_bad_documents_are_rejected():
    with pytest.raises(ValueError, match="lacks keys"):
        BM25Search([{"id": "x", "text": "no title"}])
    with pytest.raises(ValueError, match="top_k"):
        BM25Search(DOCS, top_k=0)


def test_quiet(capfd):
    BM25Search(DOCS).search_batch(["Velora", "Kesh"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
