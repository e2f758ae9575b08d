import random
import time
from collections import Counter

import pytest

from tracerl.envs.answers import normalize_answer
from tracerl.envs.multihop import MultiHopEnv
from tracerl.envs.world import RELATIONS, SPLITS, World, WorldConfig, build_world

SMALL = WorldConfig(n_entities=120, train_size=300, validation_size=50, test_size=50, heldout_size=50)


@pytest.fixture(scope="module")
def env():
    return MultiHopEnv(seed=0)


def _fingerprint(world: World):
    return [world.docs, {s: [t.to_dict() for t in world.tasks(s)] for s in SPLITS}]


def test_same_seed_same_world():
    assert _fingerprint(World(3, SMALL)) == _fingerprint(World(3, SMALL))


def test_different_seed_different_world():
    a, b = World(3, SMALL), World(4, SMALL)
    assert [d["title"] for d in a.docs] != [d["title"] for d in b.docs]
    assert [t.question for t in a.tasks("train")] != [t.question for t in b.tasks("train")]


def test_generation_is_fast():
    start = time.perf_counter()
    World(11)
    assert time.perf_counter() - start < 5.0


def test_default_sizes_and_hop_mix(env):
    sizes = {s: len(env.tasks(s)) for s in SPLITS}
    assert sizes == {"train": 2000, "validation": 200, "test": 200, "heldout": 200}
    hops = Counter(t.meta["hops"] for t in env.tasks("train"))
    assert set(hops) == {1, 2, 3} and hops[2] > 0.6 * sizes["train"]
    assert min(t.meta["hops"] for t in env.tasks("heldout")) >= 2


def test_names_are_unique(env):
    names = [normalize_answer(e.name) for e in env.world.entities.values()]
    assert len(set(names)) == len(names)


def test_documents_are_short_and_mention_related_entities(env):
    world = env.world
    for doc in world.docs:
        assert 20 < len(doc["text"]) < 200
        for rel, value in world.entities[doc["id"]].facts.items():
            if RELATIONS[rel].target:
                assert world.entities[value].name in doc["text"]


def test_splits_share_no_question(env):
    seen_ids, seen_text = set(), set()
    for split in SPLITS:
        tasks = env.tasks(split)
        ids, texts = {t.id for t in tasks}, {t.question for t in tasks}
        assert len(ids) == len(texts) == len(tasks)
        assert not ids & seen_ids and not texts & seen_text
        seen_ids |= ids
        seen_text |= texts


def test_heldout_templates_are_unseen(env):
    seen = {t.meta["template"] for s in ("train", "validation", "test") for t in env.tasks(s)}
    held = {t.meta["template"] for t in env.tasks("heldout")}
    assert held and not held & seen
    # Every relation used in heldout is still trained on somewhere.
    trained_relations = {r for t in env.tasks("train") for r in t.meta["relations"]}
    assert {r for t in env.tasks("heldout") for r in t.meta["relations"]} <= trained_relations


def test_task_metadata_is_consistent(env):
    for task in env.tasks("validation"):
        meta = task.meta
        assert meta["hops"] == len(meta["relations"]) == len(meta["chain"]) == len(meta["supporting_docs"])
        assert meta["split"] == "validation"
        assert [env.world.entities[d].name for d in meta["supporting_docs"]] == meta["chain"]


def _assert_answerable(env, task):
    for name, doc_id in zip(task.meta["chain"], task.meta["supporting_docs"]):
        hits = env.world.retriever.search(name, env.top_k)
        assert doc_id in [h["id"] for h in hits], (task.question, name)
    last_doc = env.world.doc_text[task.meta["supporting_docs"][-1]]
    assert normalize_answer(task.answers[0]) in normalize_answer(last_doc)
    state = env.initial_state(task)
    turns = env.oracle_turns(task, random.Random(0), {})
    assert len(turns) == task.meta["hops"] + 1 <= env.max_turns
    for i, turn in enumerate(turns):
        state, result = env.step(state, turn)
        assert result.info["format_error"] is None
        assert result.done == (i == len(turns) - 1)
    assert result.reward == 1.0


@pytest.mark.parametrize("split", SPLITS)
def test_every_question_is_answerable(env, split):
    for task in env.tasks(split):
        _assert_answerable(env, task)


def test_four_hop_questions_when_asked():
    env = MultiHopEnv(seed=1, max_turns=5, n_entities=150, hop_mix={2: 0.5, 4: 0.5},
                      train_size=100, validation_size=20, test_size=20, heldout_size=20)
    hops = Counter(t.meta["hops"] for s in SPLITS for t in env.tasks(s))
    assert set(hops) == {2, 4}
    for split in SPLITS:
        for task in env.tasks(split):
            _assert_answerable(env, task)


def test_small_world_shrinks_train_first():
    world = World(0, WorldConfig(n_entities=80, train_size=5000))
    assert len(world.tasks("validation")) == 200 and len(world.tasks("test")) == 200
    assert 0 < len(world.tasks("train")) < 5000


def test_wrong_answer_has_the_right_type(env):
    rng = random.Random(0)
    for task in env.tasks("test")[:50]:
        wrong = env.world.wrong_answer(task, rng)
        assert normalize_answer(wrong) not in {normalize_answer(a) for a in task.answers}
        target = RELATIONS[task.meta["relations"][-1]].target
        if target:
            assert any(e.name == wrong and e.type == target for e in env.world.entities.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hop_mix": {5: 1.0}}, "hop_mix"),
        ({"hop_mix": {}}, "hop_mix"),
        ({"n_entities": 10}, "n_entities"),
        ({"train_size": -1}, "split sizes"),
        ({"heldout_fraction": 1.5}, "heldout_fraction"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_world_cache_returns_the_same_object():
    assert build_world(0, SMALL, 3) is build_world(0, SMALL, 3)
