"""SQuAD / Search-R1 answer matching (eval.em=squad) beside tracerl's own, and `tracerl eval` reporting both."""

import json
from pathlib import Path

import pytest
import torch

from tracerl.config import ConfigError, load_config
from tracerl.envs import answers
from tracerl.envs.answers import (em_mode, exact_match, f1_score, normalize_answer, normalize_answer_squad,
                                  set_em_mode)
from tracerl.envs.base import Task
from tracerl.evaluate import final_answer, squad_scores
from tracerl.rollout import Trajectory
from tracerl.rundir import EVAL_CLI_FILE

FIXTURES = Path(__file__).parent / "fixtures"

# (text, SQuAD normal form): lowercase, ASCII punctuation deleted, whole-word a/an/the dropped, whitespace collapsed
SQUAD_NORMAL = [
    ("The Beatles", "beatles"),
    ("  An   apple a day ", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # 'the' inside a word stays
    ("Ann's 'a' (A) pie.", "anns pie"),
    ("U.S.A.", "usa"),
    ("3.5", "35"),  # the decimal point goes, unlike tracerl's canonical numbers
    ("1,000", "1000"),
    ("rock-n-roll!", "rocknroll"),
    ("\tNew\nYork\u00a0City ", "new york city"),  # str.split whitespace, the no-break space included
    ("“Paris”", "“paris”"),  # typographic quotes are not ASCII punctuation
    ("ＡＢＣ", "ａｂｃ"),  # no NFKC: full-width letters stay full-width
    ("Straße", "straße"),  # lower(), not casefold()
    ("", ""),
    ("a an the", ""),
]


@pytest.mark.parametrize("text,normal", SQUAD_NORMAL)
def test_squad_normalisation(text, normal):
    assert normalize_answer_squad(text) == normal


# (prediction, gold, tracerl EM, SQuAD EM): where the two disagree, and some where they agree
DISAGREE = [
    ("7.0", "7", 1.0, 0.0),  # tracerl: canonical numbers; SQuAD: "70" vs "7"
    ("3.5", "35", 0.0, 1.0),  # tracerl keeps the decimal point; SQuAD deletes it
    ("“Paris”", "Paris", 1.0, 0.0),  # Unicode punctuation
    ("Jean–Luc", "JeanLuc", 1.0, 0.0),  # en dash
    ("ＡＢＣ", "abc", 1.0, 0.0),  # NFKC
    ("STRASSE", "Straße", 1.0, 0.0),  # casefold
    ("café", "cafe", 0.0, 0.0),  # neither strips accents
    ("the Beatles", "Beatles", 1.0, 1.0),
    ("A-ha", "aha", 1.0, 1.0),
]


@pytest.mark.parametrize("pred,gold,em_tracerl,em_squad", DISAGREE)
def test_the_two_modes_on_a_table(pred, gold, em_tracerl, em_squad):
    assert exact_match(pred, [gold]) == em_tracerl == exact_match(pred, gold, "tracerl")
    assert exact_match(pred, [gold], "squad") == em_squad
    assert f1_score(pred, [gold], "squad") == em_squad  # one token each: F1 is the EM


def test_at_least_three_disagreements_each_way_counted():
    assert sum(t > s for _, _, t, s in DISAGREE) >= 3 and sum(s > t for _, _, t, s in DISAGREE) >= 1


def test_squad_em_any_gold_and_f1_on_tokens():
    assert exact_match("the eiffel tower", ["Tower", "Eiffel Tower."], "squad") == 1.0
    assert exact_match("x", [], "squad") == 0.0
    assert f1_score("the new york city", ["New York"], "squad") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1_score("", [""], "squad") == 1.0 and f1_score("a", ["b"], "squad") == 0.0
    assert f1_score("paris france", ["London", "Paris"], "squad") == pytest.approx(2 / 3)  # the best gold
    assert normalize_answer(None) == normalize_answer_squad(None) == ""


def test_process_default_mode_and_bad_mode():
    assert em_mode() == "tracerl"
    try:
        set_em_mode("squad")
        assert exact_match("7.0", "7") == 0.0 and exact_match("3.5", "35") == 1.0
        assert exact_match("7.0", "7", "tracerl") == 1.0  # an explicit mode wins
    finally:
        set_em_mode("tracerl")
    assert answers._mode == "tracerl" and exact_match("7.0", "7") == 1.0
    with pytest.raises(ValueError, match="unknown exact-match mode 'exact'; valid: tracerl, squad"):
        exact_match("a", "a", "exact")


def test_config_key():
    assert load_config().eval.em == "tracerl" and load_config(None, ["eval.em=squad"]).eval.em == "squad"
    with pytest.raises(ConfigError, match="config key 'eval.em': must be 'tracerl' or 'squad'"):
        load_config(None, ["eval.em=exact"])


def _traj(golds, history, em=0.0):
    t = Trajectory(Task("t", "q?", tuple(golds)), 0, [], [], [], 0, {"history": history})
    t.info = {"em": em, "f1": em}
    return t


def test_squad_scores_from_the_final_answer():
    trajs = [_traj(["7"], [{"action": "search", "query": "x"}, {"action": "answer", "answer": "7.0"}], em=1.0),
             _traj(["35"], [{"action": "answer", "answer": "3.5"}]),
             _traj(["Paris"], [{"action": "invalid", "format_error": "no_action"}])]  # no answer: 0
    assert [final_answer(t) for t in trajs] == ["7.0", "3.5", None]
    assert squad_scores(trajs) == {"em_squad": pytest.approx(1 / 3), "f1_squad": pytest.approx(1 / 3)}
    assert squad_scores([]) == {"em_squad": 0.0, "f1_squad": 0.0}


@pytest.mark.parametrize("mode", ["tracerl", "squad"])
def test_eval_json_has_both(tmp_path, capsys, mode):
    """`tracerl eval MODEL --config real_qa.yaml --split test --json eval.em=MODE` on a tiny random model."""
    from tracerl.cli import main
    from tracerl.models.io import atomic_save_pretrained
    from tracerl.models.tiny import build_tiny_model, train_tokenizer

    questions = [json.loads(line)["question"] for line in (FIXTURES / "real_qa_tiny.jsonl").read_text().splitlines()]
    tok = train_tokenizer(questions, vocab_size=300)
    atomic_save_pretrained(build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0),
                           tok, tmp_path / "model")
    config = tmp_path / "real_qa.yaml"
    config.write_text(f"""
model: {{preset: path, path: {tmp_path / 'model'}, max_context: 512}}
env: {{name: real_qa, max_turns: 2, options: {{data_root: {FIXTURES}, test_files: [real_qa_tiny.jsonl], top_k: 2}}}}
rollout: {{max_turn_tokens: 8}}
""")
    threads = torch.get_num_threads()
    try:
        assert main(["eval", str(tmp_path / "model"), "--config", str(config), "--split", "test", "--json",
                     "--out", str(tmp_path / "eval"), f"eval.em={mode}", "run.threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)
        set_em_mode("tracerl")
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-2])  # the JSON line, then the report path
    assert {"em", "f1", "em_squad", "f1_squad"} <= set(result) and result["em_mode"] == mode
    assert all(0.0 <= result[k] <= 1.0 for k in ("em", "f1", "em_squad", "f1_squad"))
    assert f"EM ({mode})" in printed and "EM (squad)" in printed and "F1 (squad)" in printed
    logged = json.loads((tmp_path / "eval" / EVAL_CLI_FILE).read_text().splitlines()[-1])
    assert logged["em_squad"] == result["em_squad"] and logged["em_mode"] == mode
