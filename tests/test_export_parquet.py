"""`tracerl export-data`: a split in the Search-R1 / verl parquet layout, read back by tracerl's own reader."""

import os
import sys
from pathlib import Path

import pytest

from tracerl.cli import main
from tracerl.config import load_config
from tracerl.envs.qa_data import load_qa_file
from tracerl.errors import TracerlError
from tracerl.export_data import export_split, search_r1_rows
from tracerl.setup import build_env

pq = pytest.importorskip("pyarrow.parquet")

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_WORLD = ["env.options.train_size=30", "env.options.validation_size=5", "env.options.test_size=12",
               "env.options.heldout_size=0"]
CONFIGS = {
    "multihop": SMALL_WORLD,
    "arith": ["env.name=arith", "env.max_turns=1", "env.options={train_size: 20, test_size: 15}"],
    "real_qa": ["env.name=real_qa", f"env.options={{data_root: {FIXTURES}, test_files: [real_qa_tiny.jsonl]}}"],
}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("env", sorted(CONFIGS))
def test_round_trip(tmp_path, capsys, env):
    out = tmp_path / f"{env}.parquet"
    assert main(["export-data", "--split", "test", "--out", str(out), *CONFIGS[env]]) == 0
    cfg = load_config(None, CONFIGS[env])
    built = build_env(cfg)
    tasks = built.tasks("test")
    assert capsys.readouterr().out.strip() == f"wrote {len(tasks)} {cfg.env.name} test tasks to {out}"

    rows = pq.read_table(out).to_pylist()
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(tasks)))
    for r, t in zip(rows, tasks):
        assert r["prompt"] == [{"role": "user", "content": built.user_prompt(t)}]
        assert r["reward_model"] == {"style": "rule", "ground_truth": {"target": list(t.answers)}}
        assert r["ability"] == ("math" if env == "arith" else "fact-reasoning")
        assert r["data_source"] == t.meta.get("dataset", f"tracerl_{env}")
        assert r["extra_info"]["split"] == "test"
        assert {k for k in t.meta if k != "split"} <= set(r["extra_info"])

    back = [item.task for item in load_qa_file(out)]  # tracerl's Search-R1 reader
    assert [(b.id, b.question, b.answers) for b in back] == [(t.id, t.question, t.answers) for t in tasks]
    assert all(b.meta["split"] == "test" for b in back)

    # without Search-R1's golden_answers column the reader takes reward_model.ground_truth.target
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(out).drop_columns(["golden_answers", "id"]), bare)
    assert [(b.question, b.answers) for b in (i.task for i in load_qa_file(bare))] == \
        [(t.question, t.answers) for t in tasks]


def test_meta_that_parquet_cannot_hold_goes_as_json(tmp_path):
    cfg = load_config(None, CONFIGS["arith"])
    rows = search_r1_rows(build_env(cfg), "train")
    assert isinstance(rows[0]["extra_info"]["steps"], str) and rows[0]["extra_info"]["steps"].startswith("[[")
    assert rows[0]["extra_info"]["ops"] == len(build_env(cfg).tasks("train")[0].meta["steps"])


def test_missing_pyarrow_is_one_line(tmp_path, capsys, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert main(["export-data", "--out", str(tmp_path / "x.parquet"), *SMALL_WORLD]) == 2
    assert "needs pyarrow; install it with `pip install 'tracerl[parquet]'`" in _one_line_error(capsys)
    assert not (tmp_path / "x.parquet").exists()


def test_unknown_or_empty_split(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export-data", "--split", "dev", "--out", str(tmp_path / "x.parquet")])
    assert e.value.code == 2 and "argument --split: invalid choice: 'dev'" in _one_line_error(capsys)
    with pytest.raises(TracerlError, match="unknown split 'dev'; valid: train, validation, test, heldout"):
        export_split(load_config(), "dev", tmp_path / "x.parquet")
    assert main(["export-data", "--split", "heldout", "--out", str(tmp_path / "x.parquet"), *SMALL_WORLD]) == 2
    assert "split 'heldout' of environment 'multihop' is empty; nothing to export" in _one_line_error(capsys)


def test_unwritable_out_paths(tmp_path, capsys):
    cases = {
        str(tmp_path / "missing" / "x.parquet"): f"cannot write {tmp_path / 'missing' / 'x.parquet'}: {tmp_path / 'missing'} does not exist",
        str(tmp_path / "file" / "x.parquet"): "file is not a directory",
        str(tmp_path): "is a directory",
        str(tmp_path / "x.jsonl"): "must end in .parquet",
    }
    (tmp_path / "file").write_text("")
    for out, message in cases.items():
        assert main(["export-data", "--out", out, *SMALL_WORLD]) == 2
        assert message in _one_line_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert main(["export-data", "--out", str(locked / "x.parquet"), *SMALL_WORLD]) == 2
            assert "permission denied" in _one_line_error(capsys)
        finally:
            locked.chmod(0o700)
    assert main(["export-data", "--out", str(tmp_path / "ok.parquet"), "env.options.bogus=1"]) == 2
    assert "bogus" in _one_line_error(capsys)


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def refuse(table, where, **kwargs):
        Path(where).write_bytes(b"partial")
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pq, "write_table", refuse)
    out = tmp_path / "x.parquet"
    assert main(["export-data", "--out", str(out), *SMALL_WORLD]) == 2
    assert f"cannot write {out}: Permission denied" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
