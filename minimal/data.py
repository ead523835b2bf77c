"""Noisy-context QA: a synthetic benchmark with hard distractors, JSONL files, and prompts.

Every example is a short list of one-sentence documents and a question that exactly one
of them answers (two of them, chained, for 2-hop questions). The distractors are *hard*:
they use the same sentence template as the gold document, about other people, with other
answers, so only the person's name tells the gold document apart.

>>> ex = generate(1, noise_ratio=0.8, gold_position="middle", split="test", seed=0)[0]
>>> ex["documents"][ex["gold"][0]], ex["question"], ex["answers"]

Entities are "First Last" names. The first names are split into two disjoint pools,
``"train"`` and ``"test"`` (so full names never cross over); the last names and the answer
values (cities, jobs, years, ...) are shared by both splits. The shipped test sets in
``data/`` use the test split; fine-tuning data uses the train split.

A second, *held-out* family (``generate(..., family="heldout")``, ``heldout_set``) has other
relations, three phrasings per fact and per question, and two-sentence documents (the fact
and a neutral filler sentence): it measures whether a method holds beyond the training
templates. Training data (the default family) never use any of it.

OpAmp's noise ratio r means ``round(1/(1-r)) - 1`` distractors per gold document
(``distractors_for_noise_ratio``): r = 0, 0.5, 0.8, 0.9 give 0, 1, 4, 9.

An example is a plain dict (see ``data/README.md`` for the schema)::

    {"id": "test-1hop-d4-middle-s0-0", "documents": [...], "gold": [2],
     "question": "In which city does Alice Smith live?", "answers": ["Paris"],
     "hops": 1, "relation": "city", "num_distractors": 4, "noise_ratio": 0.8,
     "gold_position": "middle", "split": "test", "seed": 0}
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------
# Entities and relations

FIRST_NAMES = {
    "train": (
        "Adam", "Beatrice", "Colin", "Dora", "Edward", "Fiona", "George", "Helen", "Ivan", "Julia",
        "Kevin", "Laura", "Martin", "Nina", "Oliver", "Petra", "Rafael", "Sofia", "Thomas", "Ursula",
        "Vera", "Walter", "Xavier", "Yvonne", "Zachary", "Anna", "Boris", "Chloe", "David", "Eva",
        "Henry", "Lucy", "Marco", "Olga", "Peter", "Ruth", "Simon", "Tina", "Hannah", "Igor",
    ),
    "test": (
        "Alice", "Bianca", "Carlos", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas",
        "Karen", "Leo", "Maria", "Nadia", "Oscar", "Paula", "Quentin", "Rosa", "Samuel", "Tara",
        "Victor", "Wendy", "Yusuf", "Zoe", "Amir", "Bruno", "Clara", "Diego", "Emma", "Frank",
    ),
}
SPLITS = tuple(FIRST_NAMES)

LAST_NAMES = (
    "Smith", "Jones", "Brown", "Garcia", "Miller", "Davis", "Wilson", "Moore", "Clark", "Lewis",
    "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green", "Bennett", "Nelson", "Hill",
    "Campbell", "Mitchell", "Roberts", "Evans", "Collins", "Stewart", "Morris", "Murphy", "Cooper", "Reed",
)


def full_names(split: str) -> list[str]:
    """Every "First Last" name of a split (30 x 30 = 900 for test, 40 x 30 = 1200 for train)."""
    _check_choice("split", split, SPLITS)
    return [f"{first} {last}" for first, last in itertools.product(FIRST_NAMES[split], LAST_NAMES)]


@dataclass(frozen=True)
class Relation:
    """A fact template, its question, and the values its answer can take."""

    name: str
    fact: str  # with {name} and {value}
    question: str  # with {name}
    values: tuple[str, ...]


RELATIONS = {
    r.name: r
    for r in [
        Relation("city", "{name} lives in {value}.", "In which city does {name} live?", (
            "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
            "Stockholm", "Helsinki", "Warsaw", "Athens", "Cairo", "Tokyo", "Seoul", "Lima", "Toronto", "Sydney",
            "Chicago", "Boston", "Denver", "Moscow", "Istanbul", "Nairobi", "Mumbai", "Bangkok", "Manila", "Havana",
            "Budapest", "Brussels", "Amsterdam", "Copenhagen", "Geneva", "Milan", "Munich", "Barcelona", "Montreal", "Santiago",
        )),
        # Every job starts with a consonant sound, so "works as a ..." always reads right.
        Relation("job", "{name} works as a {value}.", "What is the job of {name}?", (
            "baker", "doctor", "farmer", "lawyer", "nurse", "pilot", "teacher", "painter", "dentist", "chef",
            "plumber", "tailor", "writer", "singer", "banker", "sailor", "barber", "butcher", "judge", "waiter",
            "gardener", "carpenter", "potter", "dancer", "cashier", "librarian", "mechanic", "soldier", "surgeon", "journalist",
            "fisherman", "florist", "jeweler", "locksmith", "photographer", "pharmacist", "professor", "student", "tutor", "vet",
        )),
        Relation("year", "{name} was born in {value}.", "In which year was {name} born?",
                 tuple(str(y) for y in range(1940, 2000))),
        Relation("pet", "{name} has a pet {value}.", "What pet does {name} have?", (
            "cat", "dog", "rabbit", "parrot", "hamster", "turtle", "goldfish", "horse", "pony", "goat",
            "lizard", "snake", "ferret", "pig", "duck", "sheep", "frog", "mouse", "canary", "donkey",
            "chicken", "tortoise", "spider", "owl", "gerbil", "chinchilla", "hedgehog", "cockatoo", "llama", "alpaca",
            "iguana", "budgie", "rat", "crab", "snail", "toad", "gecko", "pigeon", "swan", "goose",
        )),
        Relation("instrument", "{name} plays the {value}.", "Which instrument does {name} play?", (
            "piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp", "saxophone", "clarinet",
            "banjo", "oboe", "trombone", "accordion", "ukulele", "harmonica", "tuba", "mandolin", "viola", "bagpipes",
            "bassoon", "xylophone", "tambourine", "organ", "sitar", "lute", "piccolo", "bugle", "cornet", "zither",
            "marimba", "bongos", "harpsichord", "kazoo", "recorder", "triangle", "glockenspiel", "didgeridoo", "dulcimer", "cymbals",
        )),
        Relation("language", "{name}'s native language is {value}.", "What is the native language of {name}?", (
            "French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Greek", "Turkish", "Arabic",
            "Hindi", "Japanese", "Korean", "Chinese", "Russian", "Swedish", "Finnish", "Danish", "Czech", "Hungarian",
            "Thai", "Vietnamese", "Welsh", "Irish", "Norwegian", "Romanian", "Bulgarian", "Croatian", "Serbian", "Ukrainian",
            "Hebrew", "Persian", "Swahili", "Bengali", "Tamil", "Urdu", "Malay", "Indonesian", "Icelandic", "Estonian",
        )),
    ]
}

# 2-hop questions go through a bridge person: "A works with B." + "B lives in Paris."
BRIDGE_FACT = "{name} works with {other}."
BRIDGE_SUBJECT = "the colleague of {name}"  # takes the place of {name} in the question

GOLD_POSITIONS = ("first", "middle", "last", "random")
HOPS = (1, 2)

# ----------------------------------------------------------------------------------------
# The held-out family: relations, phrasings and document shapes that training never uses
#
# ``generate(..., family="heldout")`` draws from these instead of ``RELATIONS``. Nothing in
# the default family (the one training data come from) shares a relation, a fact phrasing,
# a question phrasing or a filler sentence with it. Each document is two sentences about one
# person: the fact (one of three phrasings, drawn per document) and a neutral filler sentence,
# before or after it. The first sentence names the person in full, the second by first name
# (the people of one example have distinct first names, so this is never ambiguous).


@dataclass(frozen=True)
class PhrasedRelation:
    """A held-out relation: several fact phrasings, several question phrasings, its values."""

    name: str
    facts: tuple[str, ...]  # each with {name} and {value}
    questions: tuple[str, ...]  # each with {name}
    values: tuple[str, ...]


FAMILIES = ("default", "heldout", "varied")

HELDOUT_RELATIONS = {
    r.name: r
    for r in [
        PhrasedRelation("employer", (
            "{name} is employed by {value}.",
            "{name} has worked at {value} for several years.",
            "{name} draws a salary from {value}.",
        ), (
            "Which company employs {name}?",
            "Who is the employer of {name}?",
            "At which company does {name} work?",
        ), (
            "Google", "Siemens", "Nokia", "Nestle", "Shell", "Boeing", "Airbus", "Samsung", "Sony", "Intel",
            "IBM", "Oracle", "Adobe", "Netflix", "Spotify", "Ikea", "Lego", "Philips", "Bosch", "Unilever",
            "Pfizer", "Novartis", "Heineken", "Canon", "Nikon", "Microsoft", "Amazon", "Ericsson", "Deloitte", "Roche",
            "Danone", "Carrefour", "Walmart", "Starbucks", "Xerox", "Dell", "Cisco", "Nvidia", "Lufthansa", "Reuters",
        )),
        PhrasedRelation("food", (
            "{name}'s favourite food is {value}.",
            "{name} likes {value} more than any other food.",
            "Above all, {name} loves to eat {value}.",
        ), (
            "What is the favourite food of {name}?",
            "Which food does {name} like best?",
            "What does {name} most like to eat?",
        ), (
            "pizza", "sushi", "pasta", "curry", "tacos", "lasagna", "risotto", "paella", "burgers", "dumplings",
            "ramen", "pancakes", "waffles", "omelettes", "noodles", "falafel", "hummus", "kebab", "goulash", "couscous",
            "burritos", "nachos", "pretzels", "croissants", "bagels", "muffins", "stew", "salad", "soup", "chili",
            "sausages", "steak", "meatballs", "ravioli", "gnocchi", "quiche", "crepes", "porridge", "spaghetti", "lentils",
        )),
        # Every brand starts with a consonant sound, so "drives a ..." always reads right.
        PhrasedRelation("car", (
            "{name} drives a {value}.",
            "{name}'s car is a {value}.",
            "Every morning {name} commutes in a {value}.",
        ), (
            "Which car brand does {name} drive?",
            "What make of car does {name} own?",
            "What brand is the car of {name}?",
        ), (
            "Toyota", "Honda", "Ford", "Volvo", "Renault", "Peugeot", "Fiat", "Skoda", "Saab", "Tesla",
            "Porsche", "Ferrari", "Mazda", "Nissan", "Subaru", "Suzuki", "Kia", "Hyundai", "Jaguar", "Lexus",
            "Mercedes", "Bentley", "Maserati", "Lamborghini", "Citroen", "Dacia", "Jeep", "Cadillac", "Chevrolet", "Buick",
            "Dodge", "Chrysler", "Lancia", "Bugatti", "Lotus", "Rover", "Pontiac", "Daewoo", "Tata", "Mitsubishi",
        )),
        PhrasedRelation("sport", (
            "{name} plays {value} every weekend.",
            "{name}'s favourite sport is {value}.",
            "{name} is a keen {value} player.",
        ), (
            "Which sport does {name} play?",
            "What sport is {name} keen on?",
            "What is the favourite sport of {name}?",
        ), (
            "tennis", "golf", "rugby", "cricket", "hockey", "football", "basketball", "volleyball", "handball", "baseball",
            "badminton", "squash", "polo", "lacrosse", "softball", "netball", "snooker", "darts", "bowling", "croquet",
            "pickleball", "dodgeball", "korfball", "hurling", "futsal", "racquetball", "kickball", "floorball", "chess", "billiards",
        )),
        PhrasedRelation("university", (
            "{name} studied at {value}.",
            "{name} is a graduate of {value}.",
            "{name} earned a degree at {value}.",
        ), (
            "Which university did {name} attend?",
            "Where did {name} study?",
            "At which university did {name} earn a degree?",
        ), (
            "Oxford", "Cambridge", "Harvard", "Yale", "Princeton", "Stanford", "Columbia", "Cornell", "Heidelberg", "Leiden",
            "Bologna", "Uppsala", "Salamanca", "Coimbra", "Sorbonne", "Edinburgh", "Glasgow", "Durham", "Bristol", "Manchester",
            "Zurich", "Utrecht", "Leuven", "Ghent", "Krakow", "Tartu", "Padua", "Pisa", "Siena", "Berkeley",
            "Caltech", "Purdue", "Duke", "Stellenbosch", "McGill", "Melbourne", "Auckland", "Kyoto", "Tsinghua", "Yonsei",
        )),
    ]
}

# Neutral second sentences about the same person: no relation, no value, no training phrasing.
FILLERS = (
    "{name} grew up with two older sisters.",
    "{name} is usually up before sunrise.",
    "{name} keeps a very tidy desk.",
    "{name} has a calm and friendly manner.",
    "{name} rarely forgets a birthday.",
    "{name} enjoys quiet evenings at home.",
    "{name} was the youngest child in the family.",
    "{name} still writes letters by hand.",
    "{name} is known for arriving early.",
    "{name} has a dry sense of humour.",
    "{name} recently repainted the kitchen.",
    "{name} owns a large collection of old maps.",
)

# The varied training family: the six training relations, each in three fact and three question
# phrasings (the first is the default template), in two-sentence documents with filler sentences of
# its own. It shares no relation, phrasing or filler with the held-out family: training on it
# teaches "find the sentence about this person" without ever showing a held-out shape.
VARIED_RELATIONS = {
    r.name: PhrasedRelation(r.name, (r.fact, *facts), (r.question, *questions), r.values)
    for r, facts, questions in [
        (RELATIONS["city"], ("{name} has made a home in {value}.", "{name} rents a flat in {value}."),
         ("Where does {name} live?", "Which city is home to {name}?")),
        (RELATIONS["job"], ("{name} earns a living as a {value}.", "By trade, {name} is a {value}."),
         ("What does {name} do for a living?", "What is {name}'s profession?")),
        (RELATIONS["year"], ("{name} came into the world in {value}.", "The birth year of {name} is {value}."),
         ("When was {name} born?", "What year was {name} born in?")),
        (RELATIONS["pet"], ("{name} looks after a {value} at home.", "A {value} is the pet of {name}."),
         ("Which animal does {name} keep as a pet?", "What kind of pet lives with {name}?")),
        (RELATIONS["instrument"], ("{name} practises the {value} daily.", "The {value} is what {name} plays."),
         ("What instrument does {name} play?", "Which instrument is {name}'s?")),
        (RELATIONS["language"], ("{name} grew up speaking {value}.", "The mother tongue of {name} is {value}."),
         ("Which language did {name} grow up speaking?", "What is {name}'s mother tongue?")),
    ]
}
TRAIN_FILLERS = (
    "{name} likes long walks by the river.",
    "{name} is a fan of old films.",
    "{name} bakes bread on Sundays.",
    "{name} once ran a half marathon.",
    "{name} reads the news every morning.",
    "{name} has three close friends from school.",
    "{name} prefers tea to coffee.",
    "{name} is learning to paint with watercolours.",
    "{name} spends the summer holidays by the sea.",
    "{name} takes the bus to work.",
    "{name} keeps a small garden on the balcony.",
    "{name} collects postcards from every trip.",
)
# family -> (relations, filler sentences) for the phrased families
PHRASED = {"heldout": (HELDOUT_RELATIONS, FILLERS), "varied": (VARIED_RELATIONS, TRAIN_FILLERS)}

# Base seeds of the held-out grids (a cell's seed is the base seed plus its distractor count).
HELDOUT_SEED = 4234  # data/test_heldout.jsonl (test first names)
HELDOUT_VALIDATION_SEED = 14234  # heldout_set(split="train"): the validation variant
HELDOUT_NOISE_RATIOS = (0.0, 0.5, 0.8, 0.9)

# ----------------------------------------------------------------------------------------
# Generation


def distractors_for_noise_ratio(noise_ratio: float) -> int:
    """OpAmp's noise ratio r -> distractors per gold document: ``round(1/(1-r)) - 1``.

    A fraction r of the documents is noise: 0 -> 0, 0.5 -> 1, 0.8 -> 4, 0.9 -> 9.
    (Python's ``round`` sends halves to the even number: r = 0.6 gives round(2.5) - 1 = 1.)
    """
    if not 0 <= noise_ratio < 1:
        raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio!r}")
    return round(1 / (1 - noise_ratio)) - 1


def max_distractors(relations=None, hops: int = 1, split: str = "test", family: str = "default") -> int:
    """The most distractors per gold document that the name and value lists allow."""
    _check_choice("family", family, FAMILIES)
    relations = _check_relations(relations, family)
    if family in PHRASED:  # distinct first names and distinct last names within an example
        n_values = min(len(PHRASED[family][0][r].values) for r in relations)
        return min(n_values, len(FIRST_NAMES[split]), len(LAST_NAMES)) - 1
    n_values = min(len(RELATIONS[r].values) for r in relations)
    return min(n_values, len(full_names(split)) // hops) - 1  # 2-hop needs two names per chain


def generate(
    n: int,
    *,
    num_distractors: int | None = None,
    noise_ratio: float | None = None,
    gold_position: str = "random",
    hops: int = 1,
    split: str = "train",
    seed: int = 0,
    relations=None,
    family: str = "default",
) -> list[dict]:
    """Make ``n`` noisy-context QA examples, the same ones for the same arguments.

    num_distractors: distractor documents per gold document (default 0). Or give
        ``noise_ratio`` instead, turned into a count by ``distractors_for_noise_ratio``.
    gold_position: where the gold document goes: "first", "middle" (index
        ``(n_docs - n_gold) // 2``), "last", or "random". The two gold documents of a
        2-hop example sit side by side, bridge fact first.
    hops: 1, or 2 for a question through a bridge person. A 2-hop example has one
        "chain" (bridge fact + attribute fact) per person asked about; each distractor
        chain adds one distractor of each kind, so both documents of the gold chain get
        ``num_distractors`` look-alikes.
    split: "train" or "test": which pool of first names the people come from.
    relations: names from ``RELATIONS`` to cycle through (example i uses
        ``relations[i % len(relations)]``); default all of them.
    family: "default" (``RELATIONS``, one template each), "varied" (the same six relations in
        three phrasings each, two-sentence documents: the training recipe's synthetic half) or "heldout"
        (``HELDOUT_RELATIONS``: other relations, three phrasings per fact and per question,
        two-sentence documents; 1-hop only). ``relations`` then names held-out relations.
        The held-out family is for testing (split="test") and for choosing hyper-parameters
        (split="train", see ``heldout_set``), never for training.
    """
    if num_distractors is not None and noise_ratio is not None:
        raise ValueError("give num_distractors or noise_ratio, not both")
    if noise_ratio is not None:
        num_distractors = distractors_for_noise_ratio(noise_ratio)
    k = 0 if num_distractors is None else num_distractors
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"num_distractors must be a non-negative integer, got {k!r}")
    _check_choice("gold_position", gold_position, GOLD_POSITIONS)
    _check_choice("hops", hops, HOPS)
    _check_choice("split", split, SPLITS)
    _check_choice("family", family, FAMILIES)
    if family in PHRASED:
        return _generate_phrased(family, n, k, noise_ratio, gold_position, hops, split, seed, relations)
    relations = _check_relations(relations)
    if k > max_distractors(relations, hops, split):
        raise ValueError(
            f"num_distractors={k} is more than the lists allow for relations {relations} with "
            f"hops={hops}: at most {max_distractors(relations, hops, split)}"
        )

    rng = random.Random(seed)
    names = full_names(split)
    examples = []
    for i in range(n):
        relation = RELATIONS[relations[i % len(relations)]]
        make = _one_hop if hops == 1 else _two_hop
        gold_docs, distractors, question, answer = make(rng, relation, names, k)
        documents, gold = _place(gold_docs, distractors, gold_position, rng)
        examples.append({
            "id": f"{split}-{hops}hop-d{k}-{gold_position}-s{seed}-{i}",
            "documents": documents,
            "gold": gold,
            "question": question,
            "answers": [answer],
            "hops": hops,
            "relation": relation.name,
            "num_distractors": k,
            "noise_ratio": None if noise_ratio is None else float(noise_ratio),
            "gold_position": gold_position,
            "split": split,
            "seed": seed,
        })
    return examples


def _generate_phrased(family, n, k, noise_ratio, gold_position, hops, split, seed, relations) -> list[dict]:
    """``generate(..., family="heldout" or "varied")``; the arguments are already checked."""
    if hops != 1:
        raise ValueError(f"hops={hops!r}: the {family} family has 1-hop questions only")
    relations = _check_relations(relations, family)
    if k > max_distractors(relations, hops, split, family):
        raise ValueError(
            f"num_distractors={k} is more than the lists allow for {family} relations {relations}: "
            f"at most {max_distractors(relations, hops, split, family)}"
        )
    table, fillers = PHRASED[family]
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        relation = table[relations[i % len(relations)]]
        gold_docs, distractors, question, answer = _one_hop_phrased(rng, relation, split, k, fillers)
        documents, gold = _place(gold_docs, distractors, gold_position, rng)
        examples.append({
            "id": f"{split}-{family}-1hop-d{k}-{gold_position}-s{seed}-{i}",
            "documents": documents,
            "gold": gold,
            "question": question,
            "answers": [answer],
            "hops": 1,
            "relation": relation.name,
            "num_distractors": k,
            "noise_ratio": None if noise_ratio is None else float(noise_ratio),
            "gold_position": gold_position,
            "split": split,
            "seed": seed,
            "family": family,
        })
    return examples


def _one_hop_phrased(rng: random.Random, relation: PhrasedRelation, split: str, k: int, fillers):
    """k + 1 people (distinct first and last names), k + 1 distinct values, one two-sentence
    document each: the fact in a phrasing drawn per document and a filler sentence, in an
    order drawn per document. The first person is asked about, in a drawn question phrasing."""
    firsts, lasts = rng.sample(FIRST_NAMES[split], k + 1), rng.sample(LAST_NAMES, k + 1)
    values = rng.sample(relation.values, k + 1)
    docs = []
    for first, last, value in zip(firsts, lasts, values):
        fact, filler = rng.choice(relation.facts), rng.choice(fillers)
        if rng.random() < 0.5:  # filler first: it names the person in full
            sentences = [filler.format(name=f"{first} {last}"), fact.format(name=first, value=value)]
        else:
            sentences = [fact.format(name=f"{first} {last}", value=value), filler.format(name=first)]
        docs.append(" ".join(sentences))
    question = rng.choice(relation.questions).format(name=f"{firsts[0]} {lasts[0]}")
    return docs[:1], docs[1:], question, values[0]


def heldout_set(split: str = "test", *, per_cell: int = 30, seed: int | None = None) -> list[dict]:
    """The held-out grid, laid out like ``test_1hop``: noise ratio 0 (one "first" cell) and
    0.5, 0.8, 0.9 x first/middle/last, ``per_cell`` examples each (300 for 30).

    split="test" (seed ``HELDOUT_SEED``) is ``data/test_heldout.jsonl``; split="train" (seed
    ``HELDOUT_VALIDATION_SEED``) is its validation variant: the same relations, phrasings and
    layout with train-pool first names, for choosing hyper-parameters without the test set.
    A cell's seed is the base seed plus its distractor count, so the first/middle/last cells of
    one noise ratio hold the same questions, reordered; relations are cycled through the grid.
    """
    _check_choice("split", split, SPLITS)
    if seed is None:
        seed = HELDOUT_SEED if split == "test" else HELDOUT_VALIDATION_SEED
    relations, examples = list(HELDOUT_RELATIONS), []
    for level, r in enumerate(HELDOUT_NOISE_RATIOS):
        start = level * per_cell % len(relations)  # keep cycling where the last level stopped
        k = distractors_for_noise_ratio(r)
        for position in (("first", "middle", "last") if k else ("first",)):
            examples += generate(per_cell, noise_ratio=r, gold_position=position, split=split,
                                 seed=seed + k, relations=relations[start:] + relations[:start],
                                 family="heldout")
    return examples


def _one_hop(rng: random.Random, relation: Relation, names: list[str], k: int):
    """k + 1 people, k + 1 distinct values, one fact each; the first one is asked about."""
    people, values = rng.sample(names, k + 1), rng.sample(relation.values, k + 1)
    facts = [relation.fact.format(name=p, value=v) for p, v in zip(people, values)]
    return facts[:1], facts[1:], relation.question.format(name=people[0]), values[0]


def _two_hop(rng: random.Random, relation: Relation, names: list[str], k: int):
    """k + 1 chains "A works with B." + "B <relation> v."; the first chain is asked about.

    Every distractor is half of a complete chain, so a person with an attribute is always
    somebody's colleague: the model has to start from the name in the question.
    """
    people = rng.sample(names, 2 * (k + 1))
    subjects, bridges = people[: k + 1], people[k + 1 :]
    values = rng.sample(relation.values, k + 1)
    bridge_facts = [BRIDGE_FACT.format(name=s, other=b) for s, b in zip(subjects, bridges)]
    facts = [relation.fact.format(name=b, value=v) for b, v in zip(bridges, values)]
    distractors = bridge_facts[1:] + facts[1:]
    rng.shuffle(distractors)
    question = relation.question.format(name=BRIDGE_SUBJECT.format(name=subjects[0]))
    return [bridge_facts[0], facts[0]], distractors, question, values[0]


def _place(gold_docs: list[str], distractors: list[str], position: str, rng: random.Random):
    """Insert the gold documents, as one block, into the distractors. Returns (documents, gold)."""
    slots = len(distractors)  # the block can start at 0 .. slots
    start = {"first": 0, "middle": slots // 2, "last": slots}.get(position)
    if start is None:  # "random"
        start = rng.randint(0, slots)
    documents = distractors[:start] + gold_docs + distractors[start:]
    return documents, list(range(start, start + len(gold_docs)))


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}")


def _check_relations(relations, family: str = "default") -> list[str]:
    table = PHRASED[family][0] if family in PHRASED else RELATIONS
    if relations is None:
        return list(table)
    if isinstance(relations, str):
        relations = [relations]
    for r in relations:
        _check_choice("relation", r, tuple(table))
    if not relations:
        raise ValueError("relations is empty: give at least one of " + ", ".join(table))
    return list(relations)


# ----------------------------------------------------------------------------------------
# JSONL files

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# field -> (expected type(s), what it holds); checked by validate_example
SCHEMA = {
    "id": (str, "unique name of the example"),
    "documents": (list, "the context documents, in prompt order"),
    "gold": (list, "indices into documents of the gold document(s)"),
    "question": (str, "the question"),
    "answers": (list, "accepted answers"),
    "hops": (int, "1 or 2"),
    "relation": (str, "which fact template"),
    "num_distractors": (int, "distractor documents per gold document"),
    "noise_ratio": ((float, int, type(None)), "OpAmp noise ratio, or null"),
    "gold_position": (str, "first, middle, last or random"),
    "split": (str, "train or test entity pool"),
    "seed": (int, "seed given to generate"),
    "family": (str, "default or heldout (relations and phrasings)"),
    "source": (str, "where the questions come from, e.g. nq-open"),
}
# A user's own file needs only these; the other fields are checked when present, and grouping
# (minimal.evaluate) puts an example that lacks one in the cell "unknown".
REQUIRED_FIELDS = ("id", "documents", "gold", "question", "answers")


def validate_example(ex) -> None:
    """Raise ValueError naming the first missing or invalid field of an example dict."""
    if not isinstance(ex, dict):
        raise ValueError(f"expected a JSON object, got {type(ex).__name__}")
    for field, (types, meaning) in SCHEMA.items():
        if field not in ex:
            if field in REQUIRED_FIELDS:
                raise ValueError(f"missing field {field!r} ({meaning})")
            continue
        value = ex[field]
        # bool is a subclass of int in Python; it is never a valid count or seed
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"field {field!r} must be {_type_names(types)}, got {value!r}")

    def fail(field, why):
        raise ValueError(f"field {field!r} {why}, got {ex[field]!r}")

    docs = ex["documents"]
    if not docs or not all(isinstance(d, str) and d.strip() for d in docs):
        fail("documents", "must be a non-empty list of non-empty strings")
    gold = ex["gold"]
    if not gold or not all(type(g) is int and 0 <= g < len(docs) for g in gold):
        fail("gold", f"must be a non-empty list of indices in [0, {len(docs)})")
    if not ex["answers"] or not all(isinstance(a, str) and a.strip() for a in ex["answers"]):
        fail("answers", "must be a non-empty list of non-empty strings")
    if "hops" in ex:
        if ex["hops"] not in HOPS:
            fail("hops", "must be 1 or 2")
        if len(gold) != ex["hops"]:
            fail("gold", f"must hold one index per hop ({ex['hops']})")
    if ex.get("num_distractors", 0) < 0:
        fail("num_distractors", "must be >= 0")
    if ex.get("noise_ratio") is not None and not 0 <= ex["noise_ratio"] < 1:
        fail("noise_ratio", "must be in [0, 1) or null")
    if "gold_position" in ex and ex["gold_position"] not in GOLD_POSITIONS:
        fail("gold_position", f"must be one of {', '.join(GOLD_POSITIONS)}")
    if "split" in ex and ex["split"] not in SPLITS:
        fail("split", f"must be one of {', '.join(SPLITS)}")
    if "family" in ex and ex["family"] not in FAMILIES:
        fail("family", f"must be one of {', '.join(FAMILIES)}")


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def write_jsonl(examples: list[dict], path) -> Path:
    """Write one example per line (each one validated first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            try:
                validate_example(ex)
            except ValueError as err:
                raise ValueError(f"example {i} ({ex.get('id', '?')}): {err}") from None
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    """Read and validate a JSONL test set; errors name the file, the line and the field."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing one, say) are not examples
            try:
                ex = json.loads(line)
                validate_example(ex)
            except ValueError as err:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}, line {lineno}: {err}") from None
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} is an empty test set")
    return examples


def load_test_set(name_or_path) -> list[dict]:
    """A shipped test set by name ("test_1hop", "test_2hop", "test_distractors",
    "test_heldout", "test_nq"), or a path."""
    shipped = DATA_DIR / f"{name_or_path}.jsonl"
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.exists():
        return read_jsonl(shipped)
    path = Path(name_or_path)
    if not path.exists():
        names = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no test set {str(name_or_path)!r}: not a file, nor one of {names}")
    return read_jsonl(path)


# ----------------------------------------------------------------------------------------
# Real-text training and validation questions (Natural Questions, disjoint from test_nq)

NQ_TRAINVAL = "nq_trainval"  # data/nq_trainval.jsonl: one gold passage per question, no distractors
NQ_VALIDATION_EVERY = 6  # every 6th question of that file is validation, the rest training


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _mentions(passage_words: list[str], answers: list[str]) -> bool:
    text = " " + " ".join(passage_words) + " "
    return any(f" {' '.join(_words(a))} " in text for a in answers if _words(a))


def nq_examples(part: str, n: int | None = None, noise_ratios=(0.0, 0.5, 0.8), seed: int = 0) -> list[dict]:
    """Natural Questions with their Wikipedia passage and distractor passages, for training
    (``part="train"``) or choosing hyper-parameters (``part="validation"``).

    From ``data/nq_trainval.jsonl``, whose questions and passages never occur in ``test_nq``.
    Example i takes noise ratio ``noise_ratios[i % len]`` and that many distractors
    (``distractors_for_noise_ratio``): the passages of the same part that share the most words
    with the question and mention none of its answers, like a retriever's near misses. The gold
    position is drawn (seeded). ``n``: how many (default: every question of the part, shuffled).
    """
    _check_choice("part", part, ("train", "validation"))
    rows = read_jsonl(DATA_DIR / f"{NQ_TRAINVAL}.jsonl")
    rows = [r for i, r in enumerate(rows) if (i % NQ_VALIDATION_EVERY == 0) == (part == "validation")]
    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), len(rows))[: n or len(rows)]
    passages = [r["documents"][0] for r in rows]
    passage_words = [_words(p) for p in passages]
    passage_sets = [set(w) for w in passage_words]
    examples = []
    for i, q in enumerate(order):
        row, ratio = rows[q], noise_ratios[i % len(noise_ratios)]
        asked = set(_words(row["question"]))
        candidates = [j for j in range(len(rows)) if j != q and not _mentions(passage_words[j], row["answers"])]
        candidates.sort(key=lambda j: -len(asked & passage_sets[j]))
        k = distractors_for_noise_ratio(ratio)
        documents, gold = _place([passages[q]], [passages[j] for j in candidates[:k]], "random", rng)
        examples.append({
            "id": f"nq-{part}-d{k}-s{seed}-{i}", "documents": documents, "gold": gold,
            "question": row["question"], "answers": row["answers"], "hops": 1, "num_distractors": k,
            "noise_ratio": float(ratio), "gold_position": "random", "split": "train", "source": "nq-open",
        })
    return examples


# ----------------------------------------------------------------------------------------
# Prompts

INSTRUCTION = "Answer the question using the documents. Reply with the answer only."


@dataclass
class Prompt:
    """A tokenized prompt and where its parts are, as token index ranges [start, end)."""

    input_ids: torch.Tensor  # [T], long
    text: str  # the full chat-templated string
    doc_spans: list[tuple[int, int]]  # one per document
    question_span: tuple[int, int]  # the question sentence


def user_message(example: dict) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    """The user turn, with the character spans of each document and of the question."""
    text, doc_chars = INSTRUCTION + "\n\nDocuments:\n", []
    for i, doc in enumerate(example["documents"], start=1):
        text += f"[{i}] "
        doc_chars.append((len(text), len(text) + len(doc)))
        text += doc + "\n"
    text += "\nQuestion: "
    question_chars = (len(text), len(text) + len(example["question"]))
    return text + example["question"], doc_chars, question_chars


def build_prompt(tokenizer, example: dict, *, system: str | None = None) -> Prompt:
    """Chat-template the example and find each document's tokens.

    The templated text is tokenized with character offsets, and a document's tokens are
    those that overlap its characters. A token may carry the space before a document
    (" Alice"), so ``tokenizer.decode(ids[s:e]).strip() == document``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_prompt needs a fast tokenizer (it uses return_offsets_mapping)")
    message, doc_chars, question_chars = user_message(example)
    messages = [{"role": "user", "content": message}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shift = text.find(message)
    if shift < 0:
        raise ValueError("the chat template changed the user message; cannot locate the documents")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]

    def token_span(a: int, b: int) -> tuple[int, int]:
        a, b = a + shift, b + shift
        inside = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
        return inside[0], inside[-1] + 1

    return Prompt(
        input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
        text=text,
        doc_spans=[token_span(a, b) for a, b in doc_chars],
        question_span=token_span(*question_chars),
    )


def build_batch(tokenizer, examples: list[dict], *, system: str | None = None):
    """Left-padded batch for generation: ``(input_ids, attention_mask, doc_spans)``.

    input_ids and attention_mask are [B, T]; doc_spans[b] are row b's document spans,
    shifted by that row's padding.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token first")
    prompts = [build_prompt(tokenizer, ex, system=system) for ex in examples]
    T = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    doc_spans = []
    for b, p in enumerate(prompts):
        pad = T - len(p.input_ids)
        input_ids[b, pad:] = p.input_ids
        attention_mask[b, pad:] = 1
        doc_spans.append([(s + pad, e + pad) for s, e in p.doc_spans])
    return input_ids, attention_mask, doc_spans
