"""Writes data/train.jsonl and data/validation.jsonl: seeded arithmetic questions (question, expression, answer).

    python examples/calculator/make_data.py
"""

import json
import random
from pathlib import Path

from calculator import Calculator  # this folder's tool (the script's folder is on sys.path)

TEMPLATES = ("What is {e}?", "Compute {e}.", "Work out {e}.")


def expression(rng: random.Random) -> str:
    a, b, c = rng.randint(11, 99), rng.randint(11, 99), rng.randint(2, 9)
    return rng.choice([f"{a} * {b}", f"{a} * {b} - {c}", f"{a} + {b} * {c}", f"({a} + {b}) * {c}", f"{a} * {c} + {b}"])


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    seen = set()
    for split, n in (("train", 4000), ("validation", 50)):
        with open(out / f"{split}.jsonl", "w") as f:
            written = 0
            while written < n:
                e = expression(rng)
                if e in seen:
                    continue
                seen.add(e)
                f.write(json.dumps({"question": rng.choice(TEMPLATES).format(e=e), "expression": e,
                                    "answer": int(Calculator()(e)), "level": e.count(" ") // 2}) + "\n")
                written += 1


if __name__ == "__main__":
    main()
