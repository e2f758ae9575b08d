import pytest

from tracerl.envs.answers import exact_match, f1_score, normalize_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Velora City!", "velora city"),
        ("  an   Apple, a day ", "apple day"),
        ("Marla-Quenton", "marlaquenton"),
        ("", ""),
        ("the", ""),
        ("Yes.", "yes"),
        ("NO!", "no"),
        ("7.0", "7"),
        ("3.50", "3.5"),
        ("1,000", "1000"),
        ("-5 apples", "-5 apples"),
        ("“Quoted” — text", "quoted text"),
        ("Straße", "strasse"),
        ("ＡＢＣ １２", "abc 12"),  # full-width forms fold to ASCII
        ("Café", "café"),
        ("$5", "5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_tolerates_non_strings():
    assert normalize_answer(None) == ""
    assert normalize_answer(7) == "7"


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Velora", ["Velora City", "Velora"]) == 1.0
    assert exact_match("Velora", "Velora") == 1.0  # a single gold string is accepted
    assert exact_match("Velor", ["Velora"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_exact_match_numbers_and_yes_no():
    assert exact_match("7", ["7.0"]) == 1.0
    assert exact_match("1,000", ["1000"]) == 1.0
    assert exact_match("3.5", ["35"]) == 0.0
    assert exact_match("Yes", ["yes"]) == 1.0
    assert exact_match("yes", ["no"]) == 0.0


def test_exact_match_empty_strings():
    assert exact_match("", [""]) == 1.0
    assert exact_match("", ["Velora"]) == 0.0
    assert exact_match("The", [""]) == 1.0  # only an article: normalises to empty


def test_f1_partial_overlap():
    assert f1_score("Velora City", ["Velora"]) == pytest.approx(2 / 3)
    assert f1_score("Marla Quenton", ["Quenton", "Marla Quenton"]) == 1.0
    assert f1_score("red blue", ["blue green yellow"]) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_f1_repeated_tokens_are_counted_once_each():
    assert f1_score("a b b", ["b"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_f1_edge_cases():
    assert f1_score("", [""]) == 1.0
    assert f1_score("", ["x"]) == 0.0
    assert f1_score("x", [""]) == 0.0
    assert f1_score("x", []) == 0.0
    assert f1_score("Paris", ["London"]) == 0.0


def test_scores_are_in_unit_interval():
    for pred, gold in [("a b c", "b c d"), ("x", "x y z w"), ("1.0", "1")]:
        assert 0.0 <= f1_score(pred, [gold]) <= 1.0
        assert exact_match(pred, [gold]) in (0.0, 1.0)
        assert exact_match(pred, [gold]) <= f1_score(pred, [gold])
