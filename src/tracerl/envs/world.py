"""A synthetic knowledge world for multi-hop search questions, generated from an integer seed.

The world has people, organisations, cities, countries and written works with invented names, linked
by functional relations (person born_in city, org founded_by person, city located_in country, ...)
and carrying literal attributes (years, professions, industries, genres). Each entity gets one short
encyclopedia-style document that states its own facts and names the entities it points to, so a
search for one entity also surfaces pages that merely mention it (realistic distractors).

A k-hop question follows a chain of k relations from a named start entity ("In which country is the
city where Marla Quenton was born?"); answering it needs k searches, one per entity on the path.
Invented names are short and unique at the level of stemmed BM25 tokens, so an entity's name is an
unambiguous query; the generator still checks every question's retrievability and drops the rest.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any

import Stemmer

from tracerl.envs.answers import normalize_answer
from tracerl.envs.base import Task
from tracerl.errors import OptionError
from tracerl.task import SPLITS  # noqa: F401  (re-exported: multihop reads it from here)
from tracerl.tools.bm25 import BM25Search


@dataclass(frozen=True)
class Relation:
    """A functional relation (or literal attribute) with its question phrasings."""

    name: str
    subject: str  # entity type the relation starts from
    target: str | None  # entity type of the value; None for a literal attribute
    question: str  # asks for the value of {x}
    phrase: str  # names the value of {x} inside a longer question
    fact: str  # states "{x} ... {y}"; used in demonstration thoughts


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation("born_in", "person", "city", "Where was {x} born?", "the city where {x} was born", "{x} was born in {y}"),
        Relation("lives_in", "person", "city", "Where does {x} live?", "the city where {x} lives", "{x} lives in {y}"),
        Relation("works_for", "person", "org", "Which organisation does {x} work for?", "the employer of {x}", "{x} works for {y}"),
        Relation("profession", "person", None, "What is the profession of {x}?", "the profession of {x}", "{x} is a {y}"),
        Relation("birth_year", "person", None, "In what year was {x} born?", "the birth year of {x}", "{x} was born in {y}"),
        Relation("founded_by", "org", "person", "Who founded {x}?", "the founder of {x}", "{x} was founded by {y}"),
        Relation("headquartered_in", "org", "city", "Where is {x} headquartered?", "the city where {x} is headquartered", "{x} is headquartered in {y}"),
        Relation("org_founded", "org", None, "In what year was {x} founded?", "the founding year of {x}", "{x} was founded in {y}"),
        Relation("industry", "org", None, "What industry is {x} in?", "the industry of {x}", "{x} is in {y}"),
        Relation("written_by", "work", "person", "Who wrote {x}?", "the author of {x}", "{x} was written by {y}"),
        Relation("published_by", "work", "org", "Which organisation published {x}?", "the publisher of {x}", "{x} was published by {y}"),
        Relation("published_year", "work", None, "In what year was {x} published?", "the publication year of {x}", "{x} was published in {y}"),
        Relation("genre", "work", None, "What kind of work is {x}?", "the genre of {x}", "{x} is a {y}"),
        Relation("located_in", "city", "country", "In which country is {x}?", "the country of {x}", "{x} is in {y}"),
        Relation("mayor", "city", "person", "Who is the mayor of {x}?", "the mayor of {x}", "the mayor of {x} is {y}"),
        Relation("city_founded", "city", None, "In what year was {x} founded?", "the founding year of {x}", "{x} was founded in {y}"),
        Relation("capital", "country", "city", "What is the capital of {x}?", "the capital of {x}", "the capital of {x} is {y}"),
    )
}

PROFESSIONS = ("painter", "chemist", "architect", "lawyer", "poet", "engineer", "historian", "surgeon",
               "composer", "botanist", "astronomer", "sculptor", "banker", "geologist", "translator")
INDUSTRIES = ("shipping", "banking", "mining", "publishing", "textiles", "brewing", "railways",
              "insurance", "printing", "glassmaking", "timber", "shipbuilding")
GENRES = ("novel", "play", "poem", "memoir", "essay", "ballad")
ORG_SUFFIXES = ("Company", "Group", "Guild", "Trust", "Foundry", "Holdings", "Partners", "Society")
TITLE_NOUNS = ("Letters", "Chronicle", "Garden", "Harbor", "Lantern", "Mirror", "Voyage", "Winter",
               "Orchard", "Tide", "Crown", "Ember")
COUNTRY_SUFFIXES = ("ia", "land", "mark", "ora")

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
           "t", "tr", "v", "z", "th", "sh", "c", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "nd", "x")


@dataclass
class Entity:
    """One world entity; `facts` maps a relation name to an entity id or a literal value."""

    id: str
    type: str
    name: str
    aliases: tuple[str, ...] = ()
    facts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorldConfig:
    """Size and question-mix knobs of a generated world."""

    n_entities: int = 300  # people, orgs, cities, works and countries together
    hop_mix: Any = ((1, 0.1), (2, 0.75), (3, 0.15))  # {hops: weight}; add 4 only with max_turns >= 5
    train_size: int = 2000
    validation_size: int = 200
    test_size: int = 200
    heldout_size: int = 200
    heldout_fraction: float = 0.2  # share of 2+ hop relation chains reserved for "heldout"

    def __post_init__(self):
        mix = dict(self.hop_mix.items() if isinstance(self.hop_mix, dict) else self.hop_mix)
        try:
            mix = {int(k): float(v) for k, v in mix.items()}
        except (TypeError, ValueError):
            raise OptionError(f"hop_mix must map hop counts to weights, got {self.hop_mix!r}") from None
        if not mix or any(k not in (1, 2, 3, 4) or v < 0 for k, v in mix.items()) or sum(mix.values()) <= 0:
            raise OptionError(f"hop_mix needs hop counts in 1..4 with non-negative weights, got {mix}")
        # Stored as a sorted tuple so the config stays hashable (worlds are cached by config).
        object.__setattr__(self, "hop_mix", tuple(sorted((k, v) for k, v in mix.items() if v > 0)))
        if self.n_entities < 40:
            raise OptionError(f"n_entities must be >= 40, got {self.n_entities}")
        if min(self.train_size, self.validation_size, self.test_size, self.heldout_size) < 0:
            raise OptionError("split sizes must be >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise OptionError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def max_hops(self) -> int:
        return max(k for k, _ in self.hop_mix)

    @staticmethod
    def option_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(WorldConfig))


class _NameMaker:
    """Pronounceable invented words whose stemmed forms are unique and not English template words."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.stemmer = Stemmer.Stemmer("english")
        vocab = " ".join(r.question + " " + r.phrase + " " + r.fact for r in RELATIONS.values())
        vocab += " " + " ".join(PROFESSIONS + INDUSTRIES + GENRES + ORG_SUFFIXES + TITLE_NOUNS)
        vocab += " is a born in lives and works for firm founded by it headquartered published city country whose capital its mayor"
        self.used = {self.stemmer.stemWord(w.strip("?{}.,").lower()) for w in vocab.split()}

    def word(self, suffixes: tuple[str, ...] = ("",)) -> str:
        while True:
            n = 2 if self.rng.random() < 0.85 else 3  # short names cost a tiny model fewer tokens
            sylls = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            word = ("".join(sylls) + self.rng.choice(_CODAS) + self.rng.choice(suffixes)).capitalize()
            stem = self.stemmer.stemWord(word.lower())
            if 4 <= len(word) <= 9 and stem not in self.used:
                self.used.add(stem)
                return word


def with_articles(text: str) -> str:
    """Turn "a" into "an" before a vowel ("a engineer" -> "an engineer")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _entity_counts(n: int) -> dict[str, int]:
    counts = {"country": max(3, n // 20), "city": round(0.15 * n), "org": round(0.2 * n), "work": round(0.15 * n)}
    counts["person"] = n - sum(counts.values())
    return counts


def _make_entities(seed: int, n: int) -> dict[str, Entity]:
    rng = random.Random(f"tracerl-world-{seed}-entities")
    names = _NameMaker(rng)
    counts = _entity_counts(n)
    ids = {t: [f"{t}{i:03d}" for i in range(c)] for t, c in counts.items()}
    ents: dict[str, Entity] = {}
    for i in ids["country"]:
        ents[i] = Entity(i, "country", names.word(COUNTRY_SUFFIXES))
    for i in ids["city"]:
        name = names.word()
        ents[i] = Entity(i, "city", name, (f"{name} City",))
    for i in ids["org"]:
        word = names.word()
        ents[i] = Entity(i, "org", f"{word} {rng.choice(ORG_SUFFIXES)}", (word,))
    first_names = [names.word() for _ in range(max(8, counts["person"] // 3))]
    for i in ids["person"]:
        surname = names.word()
        ents[i] = Entity(i, "person", f"{rng.choice(first_names)} {surname}", (surname,))
    for i in ids["work"]:
        title = f"{names.word()} {rng.choice(TITLE_NOUNS)}"
        ents[i] = Entity(i, "work", f"The {title}" if rng.random() < 0.5 else title)

    # Every country gets at least one city; its first city is the capital.
    cities = list(ids["city"])
    rng.shuffle(cities)
    for j, c in enumerate(cities):
        ents[c].facts["located_in"] = ids["country"][j % len(ids["country"])]
        ents[c].facts["city_founded"] = str(rng.randint(1100, 1800))
    for c in reversed(cities):
        ents[ents[c].facts["located_in"]].facts["capital"] = c
    for p in ids["person"]:
        born, lives = rng.sample(ids["city"], 2)
        ents[p].facts.update(born_in=born, lives_in=lives, works_for=rng.choice(ids["org"]),
                             profession=rng.choice(PROFESSIONS), birth_year=str(rng.randint(1890, 1990)))
    for o in ids["org"]:
        founder = rng.choice(ids["person"])
        year = min(2020, int(ents[founder].facts["birth_year"]) + rng.randint(25, 50))
        ents[o].facts.update(founded_by=founder, headquartered_in=rng.choice(ids["city"]),
                             org_founded=str(year), industry=rng.choice(INDUSTRIES))
    for c, mayor in zip(ids["city"], rng.sample(ids["person"], len(ids["city"]))):
        ents[c].facts["mayor"] = mayor
    for w in ids["work"]:
        author = rng.choice(ids["person"])
        year = min(2023, int(ents[author].facts["birth_year"]) + rng.randint(20, 60))
        ents[w].facts.update(written_by=author, published_by=rng.choice(ids["org"]),
                             published_year=str(year), genre=rng.choice(GENRES))
    return ents


def _document(e: Entity, ents: dict[str, Entity]) -> str:
    return with_articles(_raw_document(e, ents))


def _raw_document(e: Entity, ents: dict[str, Entity]) -> str:
    f = {k: (ents[v].name if v in ents else v) for k, v in e.facts.items()}
    if e.type == "person":
        return (f"{e.name} is a {f['profession']} born in {f['born_in']} in {f['birth_year']}. "
                f"{e.aliases[0]} lives in {f['lives_in']} and works for {f['works_for']}.")
    if e.type == "org":
        return (f"{e.name} is a {f['industry']} firm founded in {f['org_founded']} by {f['founded_by']}. "
                f"It is headquartered in {f['headquartered_in']}.")
    if e.type == "work":
        return f"{e.name} is a {f['published_year']} {f['genre']} by {f['written_by']}, published by {f['published_by']}."
    if e.type == "city":
        return f"{e.name} is a city in {f['located_in']}, founded in {f['city_founded']}. Its mayor is {f['mayor']}."
    return f"{e.name} is a country whose capital is {f['capital']}."


def _chain_templates(max_hops: int) -> dict[int, list[tuple[str, ...]]]:
    """All relation chains of 1..max_hops relations whose entity types connect."""
    by_hops = {1: [(r,) for r in RELATIONS]}
    for k in range(2, max_hops + 1):
        by_hops[k] = [c + (r.name,) for c in by_hops[k - 1] for r in RELATIONS.values()
                      if r.subject == RELATIONS[c[-1]].target]
    return by_hops


def _quotas(size: int, mix: dict[int, float]) -> dict[int, int]:
    """Split `size` over hop counts in proportion to `mix` (largest remainder rounding)."""
    total = sum(mix.values())
    exact = {k: size * w / total for k, w in mix.items()}
    quota = {k: math.floor(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: size - sum(quota.values())]:
        quota[k] += 1
    return quota


class World:
    """Entities, their documents, a BM25 index over them and the question splits."""

    def __init__(self, seed: int = 0, config: WorldConfig | None = None, top_k: int = 3):
        self.seed, self.config, self.top_k = seed, config or WorldConfig(), top_k
        self.entities = _make_entities(seed, self.config.n_entities)
        self.docs = [{"id": e.id, "title": e.name, "text": _document(e, self.entities)} for e in self.entities.values()]
        self.doc_text = {d["id"]: d["text"] for d in self.docs}
        self.retriever = BM25Search(self.docs, top_k=top_k)
        # An entity can be a hop of a question only if searching its name finds its own page.
        ents = list(self.entities.values())
        hits = self.retriever.search_batch([e.name for e in ents])
        self.findable = {e.id for e, h in zip(ents, hits) if e.id in {d["id"] for d in h}}
        self.splits = self._make_splits()

    def tasks(self, split: str) -> list[Task]:
        """The questions of one split."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return list(self.splits[split])

    def _resolve(self, start: str, chain: tuple[str, ...]) -> tuple[list[str], str] | None:
        """(path of entity ids searched, answer value) or None when the question is unusable."""
        path = [start]
        for rel in chain[:-1]:
            path.append(self.entities[path[-1]].facts[rel])
        value = self.entities[path[-1]].facts[chain[-1]]
        visited = path + ([value] if RELATIONS[chain[-1]].target else [])
        if len(set(visited)) < len(visited) or not self.findable.issuperset(path):
            return None  # loops back on itself ("the capital of the country of X") or not retrievable
        answer = self.entities[value].name if value in self.entities else value
        if normalize_answer(answer) not in normalize_answer(self.doc_text[path[-1]]):
            return None
        return path, value

    def _question(self, start: str, chain: tuple[str, ...]) -> str:
        desc = self.entities[start].name
        for rel in chain[:-1]:
            desc = RELATIONS[rel].phrase.format(x=desc)
        return RELATIONS[chain[-1]].question.format(x=desc)

    def _task(self, start: str, chain: tuple[str, ...], path: list[str], value: str, split: str) -> Task:
        ent = self.entities.get(value)
        answers = (ent.name, *ent.aliases) if ent else (value,)
        meta = {"split": split, "hops": len(chain), "template": ">".join(chain), "relations": list(chain),
                "supporting_docs": list(path), "chain": [self.entities[p].name for p in path],
                "answer_type": ent.type if ent else chain[-1]}
        return Task(id=f"s{self.seed}:{start}/{'+'.join(chain)}", question=self._question(start, chain),
                    answers=answers, meta=meta)

    def _candidates(self, heldout_templates: set) -> dict[tuple[bool, int], list]:
        """Usable (start, chain, path, value) per (is heldout template, hops), ambiguous ones dropped."""
        by_type: dict[str, list[str]] = {}
        for e in self.entities.values():
            by_type.setdefault(e.type, []).append(e.id)
        found, answers_of = [], {}
        for k, chains in _chain_templates(self.config.max_hops).items():
            for chain in chains if k in dict(self.config.hop_mix) else []:
                for start in by_type[RELATIONS[chain[0]].subject]:
                    resolved = self._resolve(start, chain)
                    if resolved:
                        text = self._question(start, chain)
                        answers_of.setdefault(text, set()).add(resolved[1])
                        found.append((text, start, chain, *resolved))
        # Relations are functional, so one wording has one answer; this guards the templates: a
        # question text reachable from two chains with different answers would be unanswerable.
        pools: dict[tuple[bool, int], list] = {}
        for text, start, chain, path, value in found:
            if len(answers_of.pop(text, ())) == 1:  # pop: keep the first of identical texts only
                pools.setdefault((chain in heldout_templates, len(chain)), []).append((start, chain, path, value))
        return pools

    def _make_splits(self) -> dict[str, list[Task]]:
        rng = random.Random(f"tracerl-world-{self.seed}-questions")
        mix = dict(self.config.hop_mix)
        templates = _chain_templates(self.config.max_hops)
        # Held-out chains are never asked in train/validation/test: "heldout" measures whether the
        # policy composes relations it saw separately. 1-hop chains stay in training so that every
        # relation is seen there.
        heldout_templates: set[tuple[str, ...]] = set()
        for k in sorted(mix):
            if k >= 2:
                chains = list(templates[k])
                rng.shuffle(chains)
                heldout_templates.update(chains[: max(1, round(self.config.heldout_fraction * len(chains)))])
        pools = self._candidates(heldout_templates)
        for key in sorted(pools):
            rng.shuffle(pools[key])
        c = self.config
        # Evaluation splits are filled first so that a small world shrinks "train", not them.
        plan = [("validation", c.validation_size, False), ("test", c.test_size, False),
                ("train", c.train_size, False), ("heldout", c.heldout_size, True)]
        splits: dict[str, list[Task]] = {}
        for split, size, held in plan:
            split_mix = {k: w for k, w in mix.items() if k >= 2} if held else mix
            tasks = []
            for k, quota in (_quotas(size, split_mix) if split_mix else {}).items():
                pool = pools.get((held, k), [])
                taken, pools[(held, k)] = pool[:quota], pool[quota:]
                tasks += [self._task(s, ch, p, v, split) for s, ch, p, v in taken]
            rng.shuffle(tasks)
            splits[split] = tasks
        return splits

    def wrong_answer(self, task: Task, rng: random.Random) -> str:
        """A plausible wrong answer: another entity of the answer's type, or another attribute value."""
        rel = RELATIONS[task.meta["relations"][-1]]
        golds = {normalize_answer(a) for a in task.answers}
        if rel.target:
            options = sorted({e.name for e in self.entities.values() if e.type == rel.target})
        else:
            options = sorted({e.facts[rel.name] for e in self.entities.values() if rel.name in e.facts})
        options = [o for o in options if normalize_answer(o) not in golds] or ["unknown"]
        return rng.choice(options)

    def other_entity_name(self, rng: random.Random, exclude: list[str]) -> str:
        """The name of a random entity not in `exclude` (for irrelevant searches in noisy demos)."""
        excluded = set(exclude)
        names = sorted(e.name for e in self.entities.values() if e.name not in excluded)
        return rng.choice(names)


@functools.lru_cache(maxsize=8)
def build_world(seed: int = 0, config: WorldConfig | None = None, top_k: int = 3) -> World:
    """A cached `World` (generation is deterministic, so equal arguments give equal worlds)."""
    return World(seed, config, top_k)
