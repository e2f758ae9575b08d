"""Question-answering data files: tracerl's real-QA JSONL and Search-R1's layout, plus retrieval corpora.

Two record layouts are read, told apart per record:

* real-QA (the schema of `shared/data/real_qa/`): `id`, `question`, `answers` (gold first, then
  aliases), `dataset`, `type`, `paragraphs` (`title`, `text`, `is_supporting`). The paragraphs are
  the question's candidate documents; the supporting ones are its gold documents.
* Search-R1 (its `data_process` scripts write parquet; JSONL with the same fields is read too):
  `question`, `golden_answers` (or `reward_model.ground_truth.target`), `data_source`, optional `id`
  / `extra_info.index` and `metadata`. These carry no documents: retrieval goes to a corpus file
  or a retrieval server.

Every problem is reported as one line naming the file and the line (parquet: the row number).

A document's id is a hash of its title and text, so the same paragraph gets the same id in a
per-question index, a pooled index and a retrieval server built from the same files; that is what
lets the gold-paragraph recall be measured whichever retriever served the episode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracerl.envs.base import Task
from tracerl.errors import DataError
from tracerl.tools.corpus import doc_id, split_contents

_HOPS_IN_TYPE = re.compile(r"^(\d+)hop")  # MuSiQue types: 2hop, 3hop1, 4hop2, ...


@dataclass
class QAItem:
    """One question with the documents that came with it (empty for Search-R1 records)."""

    task: Task
    paragraphs: list[dict[str, Any]] = field(default_factory=list)  # id, title, text, is_supporting


# ---------------------------------------------------------------------------------------------
# reading records


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) pairs of a JSONL or parquet file (parquet: row number from 1)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} {'is not a file' if p.exists() else 'does not exist'}")
    if p.suffix == ".parquet":
        yield from _parquet_rows(p)
        return
    try:
        f = p.open("rb")
    except OSError as e:
        raise DataError(f"data file {p} cannot be read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{p}:{lineno}: not valid JSON (nested too deeply)") from None
            except ValueError as e:  # e.g. an integer beyond Python's digit limit
                raise DataError(f"{p}:{lineno}: not valid JSON ({' '.join(str(e).split())[:120]})") from None


def _parquet_rows(p: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading parquet needs pyarrow; install it with `pip install 'tracerl[parquet]'` "
                        "or convert the file to JSONL") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from None
    yield from enumerate(rows, 1)


# ---------------------------------------------------------------------------------------------
# QA records -> tasks


def _string(rec: dict, key: str, where: str, required: bool = True) -> str | None:
    value = rec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: field '{key}' must be a non-empty string, got {got}")
    return value.strip()


def _answers(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist"):  # numpy arrays (parquet read through pandas)
        value = value.tolist()
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: field '{key}' must be a non-empty list of answer strings, got {got}")
    bad = [a for a in value if not isinstance(a, (str, int, float)) or isinstance(a, bool)]
    if bad:
        raise DataError(f"{where}: field '{key}' holds a {type(bad[0]).__name__}, not an answer string")
    answers = tuple(dict.fromkeys(str(a).strip() for a in value if str(a).strip()))
    if not answers:
        raise DataError(f"{where}: field '{key}' has only empty answers")
    return answers


def _paragraphs(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else ("empty" if value == [] else type(value).__name__)
        raise DataError(f"{where}: field 'paragraphs' must be a non-empty list, got {got}")
    out = []
    for i, p in enumerate(value):
        if not isinstance(p, dict):
            raise DataError(f"{where}: paragraph {i} must be an object with title, text, is_supporting")
        title, text, gold = p.get("title", ""), p.get("text"), p.get("is_supporting", False)
        if not isinstance(title, str) or not isinstance(text, str) or not isinstance(gold, bool):
            raise DataError(f"{where}: paragraph {i} needs title (string), text (string), is_supporting (bool)")
        if not text.strip():
            raise DataError(f"{where}: paragraph {i} has an empty text")
        out.append({"id": doc_id(title, text), "title": title, "text": text, "is_supporting": gold})
    return out


def hops_of(qtype: str | None, gold_count: int) -> int | None:
    """Hop count: MuSiQue spells it in the type (3hop1 -> 3); otherwise one hop per gold paragraph."""
    m = _HOPS_IN_TYPE.match(qtype or "")
    if m:
        return int(m.group(1))
    return gold_count or None


def parse_real_qa(rec: dict, where: str, default_id: str) -> QAItem:
    """A record in the schema of `shared/data/real_qa/`."""
    question = _string(rec, "question", where)
    answers = _answers(rec.get("answers"), "answers", where)
    paragraphs = _paragraphs(rec.get("paragraphs"), where)
    qid = default_id if rec.get("id") is None else rec["id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise DataError(f"{where}: field 'id' must be a string or integer")
    qtype = _string(rec, "type", where, required=False)
    dataset = _string(rec, "dataset", where, required=False) or "unknown"
    gold = [p["id"] for p in paragraphs if p["is_supporting"]]
    meta = {"dataset": dataset, "type": qtype, "hops": hops_of(qtype, len(gold)), "gold_ids": gold,
            "split": rec.get("split") if isinstance(rec.get("split"), str) else None}
    return QAItem(Task(str(qid), question, answers, meta), paragraphs)


def parse_search_r1(rec: dict, where: str, default_id: str) -> QAItem:
    """A record in Search-R1's layout (question, golden_answers, data_source, ...)."""
    question = _string(rec, "question", where)
    if "golden_answers" in rec:
        answers = _answers(rec["golden_answers"], "golden_answers", where)
    else:
        target = ((rec.get("reward_model") or {}).get("ground_truth") or {}).get("target")
        answers = _answers(target, "golden_answers", where)  # the error names the field users know
    extra = rec.get("extra_info") if isinstance(rec.get("extra_info"), dict) else {}
    # parquet gives every row every column: a missing id is None there, not absent
    qid = next((v for v in (rec.get("id"), extra.get("index"), default_id) if v is not None))
    metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    qtype = metadata.get("type") if isinstance(metadata.get("type"), str) else None
    dataset = rec.get("data_source") if isinstance(rec.get("data_source"), str) else "unknown"
    meta = {"dataset": dataset, "type": qtype, "hops": hops_of(qtype, 0), "gold_ids": [],
            "split": extra.get("split") if isinstance(extra.get("split"), str) else None}
    return QAItem(Task(str(qid), question, answers, meta), [])


def parse_qa_record(rec: Any, where: str, default_id: str) -> QAItem:
    """Either layout, told apart by its fields."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "paragraphs" in rec or "answers" in rec:
        return parse_real_qa(rec, where, default_id)
    if "golden_answers" in rec or "reward_model" in rec or "data_source" in rec:
        return parse_search_r1(rec, where, default_id)
    raise DataError(f"{where}: no answer field: expected 'answers' (+ 'paragraphs') or Search-R1's 'golden_answers'")


def load_qa_file(path: str | Path) -> list[QAItem]:
    """All questions of a JSONL or parquet file, in file order."""
    items = [parse_qa_record(rec, f"{path}:{lineno}", f"{Path(path).stem}-{lineno}")
             for lineno, rec in read_records(path)]
    if not items:
        raise DataError(f"data file {path} holds no questions")
    return items


# ---------------------------------------------------------------------------------------------
# corpora


def pooled_documents(items: list[QAItem]) -> list[dict[str, Any]]:
    """The paragraphs of all questions, each distinct paragraph once (first occurrence order)."""
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        for p in item.paragraphs:
            seen.setdefault(p["id"], {"id": p["id"], "title": p["title"], "text": p["text"]})
    return list(seen.values())


def _corpus_id(rec: dict, title: str, text: str) -> str:
    return doc_id(title, text) if rec.get("id") is None else str(rec["id"])


def load_corpus(path: str | Path) -> list[dict[str, Any]]:
    """Documents (id, title, text) from a corpus JSONL/parquet file.

    Accepted lines: Search-R1's corpus (`id`, `contents` = '"Title"\\ntext'), plain documents
    (`title`, `text`, optional `id`), or real-QA question records, whose paragraphs are pooled."""
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a corpus line must be a JSON object, got {type(rec).__name__}")
        if "paragraphs" in rec:
            new = [{"id": p["id"], "title": p["title"], "text": p["text"]}
                   for p in parse_real_qa(rec, where, str(lineno)).paragraphs]
        elif "contents" in rec:
            if not isinstance(rec["contents"], str) or not rec["contents"].strip():
                raise DataError(f"{where}: field 'contents' must be a non-empty string")
            title, text = split_contents(rec["contents"])
            new = [{"id": _corpus_id(rec, title, text), "title": title, "text": text}]
        elif "text" in rec:
            title, text = rec.get("title", ""), rec["text"]
            if not isinstance(title, str) or not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: a document needs a non-empty string 'text' (and a string 'title')")
            new = [{"id": _corpus_id(rec, title, text), "title": title, "text": text}]
        else:
            raise DataError(f"{where}: a corpus line needs 'contents' (Search-R1), 'text' or 'paragraphs'")
        for d in new:
            if d["id"] not in seen:
                seen.add(d["id"])
                docs.append(d)
    if not docs:
        raise DataError(f"corpus file {path} holds no documents")
    return docs
