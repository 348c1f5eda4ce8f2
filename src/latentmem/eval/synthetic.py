"""Synthetic personal and world facts for the many-facts benchmark (``eval/facts.py``).

Each fact is one short statement (about 15-30 tokens) about an invented entity, with a single
short answer that a model cannot know beforehand and several paraphrased questions, none of
which contains the answer. ``FactGenerator(seed)`` draws them deterministically and never
repeats an entity (a person, a place, a company) within one generator, so a wrong answer that
names an earlier fact's entity is crowding out, not ambiguity.

    gen = FactGenerator(seed=0)
    f = gen.fact()   # {"id", "kind": "fact", "relation", "entity", "text", "questions", "answer", "answers"}

Answers are drawn from large spaces (invented names, four-digit numbers, years), not from
short lists such as colours a model could guess.
"""

from __future__ import annotations

import random

FIRST = (
    "Amara Bruno Celia Dario Elif Farid Greta Hugo Ines Jonas Kenji Lena Marek Nadia Oskar Priya Quentin Rosa Soren Tamsin "
    "Ulla Viktor Wanda Xavier Yara Zoltan Anouk Basil Carmen Dmitri Esme Felix Gianna Hamid Ilse Joaquin Katya Luca Maren Niko "
    "Odile Pavel Rhea Silas Thea Umar Vera Wilhelm Ximena Yusuf"
).split()
LAST = (
    "Abara Bellweather Castellan Dunmore Eskildsen Faraday Galloway Hartigan Ivanova Jablonski Kowalczyk Lindqvist Mortensen "
    "Nakashima Okonkwo Petrakis Quintero Rasmussen Szabo Thorne Underhill Valdivia Whitcombe Yilmaz Zeller Achterberg Brannigan "
    "Cuthbert Delacroix Ellery Fennimore Grimaldi Holloway Ingersoll Jarvinen Kincaid Lachance Mbeki Nordahl Oyelaran"
).split()
PET_NAMES = (
    "Biscuit Pepper Juniper Noodle Waffles Marzipan Pickle Clementine Bramble Toffee Dumpling Pistachio Nutmeg Sprocket "
    "Truffle Gumdrop Parsnip Quince Rhubarb Saffron Tapioca Wasabi Zucchini Brisket Cinnamon Dandelion Fennel Gingersnap "
    "Hazelnut Licorice Macaroon Nougat Oatmeal Paprika Radish Sorbet Tamarind Vanilla Walnut Yam Barley Cobbler Custard "
    "Dorito Espresso Fudge Goulash Hummus Jellybean Kumquat"
).split()
PETS = ("cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goat", "pony")
_ONSET = "b br c ch d dr f g gr h k kl l m n p pr r s st t tr v w z".split()
_VOWEL = "a e i o u ai ea io ou".split()
_CODA = ("", "", "n", "r", "l", "s", "th", "m", "nd", "rk")


def _place(rng: random.Random) -> str:
    """An invented two- or three-syllable place name ("Brelmora", "Tovanth")."""
    n = rng.choice((2, 2, 3))
    parts = [rng.choice(_ONSET) + rng.choice(_VOWEL) for _ in range(n)]
    return ("".join(parts) + rng.choice(_CODA)).capitalize()


# relation -> (statement template, question templates); fields: {p} person, {x} entity, {a} answer
RELATIONS = {
    "pet_name": ("{p} has a {pet} that is called {a}, and it sleeps by the kitchen window every afternoon.",
                 ("What is the name of {p}'s {pet}?", "What is {p}'s {pet} called?", "What did {p} name the {pet}?")),
    "birthplace": ("{p} was born in the small town of {a} and still goes back there every summer.",
                   ("Where was {p} born?", "In which town was {p} born?", "What is {p}'s hometown?")),
    "locker_code": ("The code of {p}'s locker at the swimming pool is {a}, written on a note in a wallet.",
                    ("What is the code of {p}'s locker?", "Which code opens {p}'s locker at the pool?", "What number is {p}'s locker code?")),
    "moving_to": ("Next spring {p} is moving to the city of {a} to start a new job at a hospital.",
                  ("Which city is {p} moving to?", "Where is {p} moving next spring?", "To what city will {p} move?")),
    "best_friend": ("{p}'s best friend since primary school is called {a}, and they meet every Sunday.",
                    ("Who is {p}'s best friend?", "What is the name of {p}'s best friend?", "Whom does {p} meet every Sunday?")),
    "lake": ("The {x} River runs for many miles through the hills and flows into Lake {a} near the border.",
             ("Which lake does the {x} River flow into?", "Into what lake does the {x} River flow?", "Where does the {x} River end?")),
    "height": ("Mount {x} is {a} metres high, and its summit is covered with snow for most of the year.",
               ("How high is Mount {x}?", "What is the height of Mount {x} in metres?", "How many metres high is Mount {x}?")),
    "founded": ("The shipping company {x} Freight was founded in the year {a} by two brothers from the coast.",
                ("When was {x} Freight founded?", "In which year was the company {x} Freight founded?", "What year was {x} Freight set up?")),
    "capital": ("The capital of the island of {x} is the harbour town of {a}, where the ferries arrive.",
                ("What is the capital of the island of {x}?", "Which town is the capital of {x}?", "What is the main town of the island of {x}?")),
}


class FactGenerator:
    """Seeded synthetic facts; no entity (subject or answer name) is used twice by one generator."""

    def __init__(self, seed: int = 0, relations: tuple[str, ...] | None = None):
        self.rng = random.Random(f"facts-{seed}")
        self.relations = tuple(relations or RELATIONS)
        self.used: set[str] = set()
        self.count = 0
        self.seed = seed

    def _fresh(self, make) -> str:
        for _ in range(10_000):
            v = make()
            if v.lower() not in self.used:
                self.used.add(v.lower())
                return v
        raise RuntimeError("the synthetic fact generator ran out of unused entities")

    def _person(self) -> str:
        return self._fresh(lambda: f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}")

    def fact(self) -> dict:
        rng = self.rng
        rel = self.relations[rng.randrange(len(self.relations))]
        tmpl, questions = RELATIONS[rel]
        f: dict = {"pet": rng.choice(PETS)}
        if "{p}" in tmpl:
            f["p"] = self._person()
        else:
            f["x"] = self._fresh(lambda: _place(rng))
        if rel in ("birthplace", "moving_to", "lake", "capital"):
            a = self._fresh(lambda: _place(rng))
        elif rel == "pet_name":
            left = [n for n in PET_NAMES if n.lower() not in self.used]
            a = self._fresh(lambda: rng.choice(left) if left else _place(rng))
        elif rel == "best_friend":
            a = self._fresh(lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}")
        elif rel == "locker_code":
            a = str(rng.randrange(1000, 10000))
        elif rel == "height":
            a = str(rng.randrange(1200, 8000))
        else:  # founded
            a = str(rng.randrange(1820, 2020))
        f["a"] = a
        self.count += 1
        entity = f.get("p", f.get("x"))
        return {
            "id": f"synthetic-{self.seed}-{self.count}",
            "kind": "fact",
            "relation": rel,
            "entity": entity,
            "text": tmpl.format(**f),
            "questions": [q.format(**f) for q in questions],
            "answer": a,
            "answers": [a],
        }

    def facts(self, n: int) -> list[dict]:
        return [self.fact() for _ in range(n)]
