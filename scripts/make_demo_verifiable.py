"""Write the embedded verifiable prompt set: alignment/resources/demo_verifiable.jsonl.

Prompts only (no responses, no preferences): the data stage reads it with ``source: demo-verifiable``
(format ``prompts``) into a folder the online stages (reinforce, ppo, grpo) train on with a ``gold``
reward. Every row is ``{prompt, gold_answer, gold_checker, task, level}``:

* ``task: constraints`` -- a normal chat request about a topic ("Describe the ocean.") followed by
  IFEval-style constraints stated in plain words ("Answer in at most 15 words. Write your whole answer
  in lowercase letters."); ``gold_checker: constraints`` and ``gold_answer`` the matching spec as a
  JSON object (``alignment.evaluation.gold.CONSTRAINTS``). Each topic gets three constraint combinations
  from a fixed rotation, so easy ones (one loose bound, lowercase, no commas, a required word -- often
  met by chance by a small model), medium ones (two constraints, a start or end phrase, a forbidden word) and
  hard ones (exactly 3 bullet points, a JSON object, all capitals, three constraints) are mixed;
* ``task: arithmetic`` -- "What is 57 minus 20? Answer with the number only." (``number``);
* ``task: capital`` -- "What is the capital of Japan? Answer with the city name only." (``contains``).

``level`` is easy / medium / hard. Deterministic: ``python scripts/make_demo_verifiable.py`` rewrites
the identical file (a test checks this).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "alignment" / "resources" / "demo_verifiable.jsonl"

# (topic as a request's object, a word an answer may naturally use, a word it would naturally use)
TOPICS = [
    ("the ocean", "waves", "water"), ("a rainy day", "umbrella", "rain"), ("your favourite food", "taste", "eat"),
    ("the moon", "night", "sky"), ("a busy city", "traffic", "people"), ("a forest in autumn", "leaves", "trees"),
    ("the benefits of reading", "books", "read"), ("how bicycles work", "pedals", "wheels"),
    ("a good breakfast", "eggs", "morning"), ("why sleep matters", "rest", "sleep"),
    ("the planet Mars", "red", "planet"), ("learning a new language", "words", "language"),
    ("a friendly dog", "tail", "dog"), ("winter", "snow", "cold"), ("a public library", "quiet", "books"),
    ("the history of the wheel", "invention", "wheel"), ("how plants grow", "sunlight", "plants"),
    ("a trip to the mountains", "hiking", "mountains"), ("the importance of friendship", "trust", "friends"),
    ("how a rainbow forms", "light", "colors"), ("a cup of coffee", "warm", "coffee"),
    ("the life of bees", "honey", "bees"), ("why exercise is healthy", "heart", "exercise"),
    ("a thunderstorm", "lightning", "storm"), ("the desert", "sand", "hot"), ("a school day", "lessons", "school"),
    ("how computers store data", "memory", "computer"), ("the game of chess", "king", "chess"),
    ("a summer holiday", "beach", "summer"), ("the water cycle", "clouds", "water"),
    ("saving money", "budget", "money"), ("a birthday party", "cake", "birthday"),
    ("the night sky", "stars", "night"), ("recycling", "plastic", "waste"), ("a volcano", "lava", "volcano"),
    ("playing the piano", "keys", "music"), ("a farm", "cows", "farm"), ("the human heart", "blood", "heart"),
    ("electric cars", "battery", "cars"), ("a lighthouse", "ships", "light"),
]
REQUESTS = ["Describe {t}.", "Tell me about {t}.", "Write a short text about {t}.", "Explain {t} to a child.",
            "What do you think about {t}?", "Write a few lines about {t}."]

Spec = dict
Combo = Callable[[tuple[str, str, str]], tuple[str, str, Spec]]  # topic -> (level, instructions, spec)


def _words(n: int) -> Combo:
    return lambda t: ("easy", f"Answer in at most {n} words.", {"max_words": n})


def _combo(level: str, text: str, spec: Spec) -> Combo:
    return lambda t: (level, text.format(inc=t[1], exc=t[2]),
                      {k: (v.format(inc=t[1], exc=t[2]) if isinstance(v, str) else
                           [w.format(inc=t[1], exc=t[2]) for w in v] if isinstance(v, list) else v)
                       for k, v in spec.items()})


COMBOS: list[Combo] = [
    _words(30),
    _combo("easy", "Write your whole answer in lowercase letters.", {"lowercase": True}),
    _combo("easy", "Do not use any commas.", {"no_commas": True}),
    _combo("easy", "Use the word '{inc}' in your answer.", {"must_include": ["{inc}"]}),
    _words(20),
    _combo("easy", "Answer in at most 2 sentences.", {"max_sentences": 2}),
    _combo("medium", "Answer in at most 15 words, all in lowercase.", {"max_words": 15, "lowercase": True}),
    _combo("medium", "Start your answer with the word 'Sure'.", {"starts_with": "Sure"}),
    _combo("medium", "Do not use the word '{exc}'.", {"must_exclude": ["{exc}"]}),
    _combo("medium", "Answer in one sentence and do not use any commas.", {"max_sentences": 1, "no_commas": True}),
    _combo("hard", "Give exactly 3 bullet points, each on its own line starting with '- '.", {"bullets": 3}),
    _combo("medium", "End your answer with the exact phrase 'Is there anything else?'",
           {"ends_with": "Is there anything else?"}),
    _combo("medium", "Use between 10 and 40 words.", {"min_words": 10, "max_words": 40}),
    _combo("hard", "Write your whole answer in capital letters.", {"uppercase": True}),
    _combo("hard", "Answer with a JSON object with the keys \"topic\" and \"fact\", and nothing else.",
           {"json": True, "must_include": ["topic", "fact"]}),
    _combo("medium", "Use the word '{inc}' and answer in at most 25 words.", {"must_include": ["{inc}"], "max_words": 25}),
    _combo("hard", "Answer in at most 20 words, in lowercase, without commas.",
           {"max_words": 20, "lowercase": True, "no_commas": True}),
    _combo("hard", "Give exactly 2 bullet points starting with '- ' and do not use the word '{exc}'.",
           {"bullets": 2, "must_exclude": ["{exc}"]}),
]

OPS = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Peru", "Lima")]
PER_TOPIC = 3
N_ARITHMETIC = 20


def _spec(spec: Spec) -> str:
    return json.dumps(spec, ensure_ascii=False)


def build() -> list[dict]:
    rng = random.Random(20261201)
    rows: list[dict] = []
    for i, topic in enumerate(TOPICS):
        for j in range(PER_TOPIC):
            level, instructions, spec = COMBOS[(i * PER_TOPIC + j) % len(COMBOS)](topic)
            request = REQUESTS[(i + j) % len(REQUESTS)].format(t=topic[0])
            rows.append({"prompt": f"{request} {instructions}", "gold_answer": _spec(spec),
                         "gold_checker": "constraints", "task": "constraints", "level": level})
    for k in range(N_ARITHMETIC):
        name, op = OPS[k % len(OPS)]
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if name == "times" else (rng.randint(10, 99), rng.randint(2, 40))
        rows.append({"prompt": f"What is {a} {name} {b}? Answer with the number only.", "gold_answer": str(op(a, b)),
                     "gold_checker": "number", "task": "arithmetic", "level": "easy" if name == "plus" else "medium"})
    for country, city in CAPITALS:
        rows.append({"prompt": f"What is the capital of {country}? Answer with the city name only.",
                     "gold_answer": city, "gold_checker": "contains", "task": "capital", "level": "easy"})
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    return rows


def main() -> int:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
