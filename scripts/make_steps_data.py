"""Generate the multistep_arithmetic demo task: chained arithmetic on small integers,
demonstrations that show their work one operation per line and end with ``Answer: X``.

    python scripts/make_steps_data.py [--seed 20240611 --train-rows 2000 --test-rows 500
                                       --out-dir src/sftjuice/demo_data --low-quality-fraction 0]

A question is a left-to-right chain of 2-4 operations, e.g. "Compute (12 + 7) * 3 - 5.",
solved as "12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52", "Answer: 52". The numbers are
small (the first 2-30, operands of + and - 1-20, multipliers 2-9, every intermediate in
1..199) so that SmolLM2-135M-Instruct learns the task partly: after two epochs of SFT on
256 demonstrations it solved 27% of 60 test questions (56% of the easy ones, 6% medium,
none hard) and got 43% of the step lines right. ``difficulty`` is easy / medium / hard
for 2 / 3 / 4 operations.
Train and test share no question; the same seed writes the same files. Standard library
only, unless ``--low-quality-fraction`` asks for corrupted training demonstrations: those
come from ``sftjuice.verifiers.corrupt_steps`` (their ``answer`` stays the correct one), so
that option needs the project's environment (e.g. ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "multistep_arithmetic"
DIFFICULTY = {2: "easy", 3: "medium", 4: "hard"}
TEMPLATES = ("Compute {}.", "Calculate {}.", "What is {}?", "Evaluate {}.")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def make_row(rng: random.Random) -> dict:
    """One question and its worked solution, drawn again until every intermediate is in 1..199."""
    while True:
        n_steps = rng.choice(tuple(DIFFICULTY))
        value = rng.randint(2, 30)
        expression, last_op, lines = str(value), None, []
        for _ in range(n_steps):
            op = rng.choice(tuple(OPERATIONS))
            operand = rng.randint(2, 9) if op == "*" else rng.randint(1, 20)
            if op == "*" and last_op in ("+", "-"):
                expression = f"({expression})"
            result = OPERATIONS[op](value, operand)
            lines.append(f"{value} {op} {operand} = {result}")
            expression, last_op, value = f"{expression} {op} {operand}", op, result
            if not 1 <= value <= 199:
                break
        else:
            return {"prompt": rng.choice(TEMPLATES).format(expression),
                    "completion": "\n".join(lines + [f"Answer: {value}"]),
                    "answer": str(value), "task": TASK, "difficulty": DIFFICULTY[n_steps]}


def generate(n: int, seed: int) -> list[dict]:
    """n rows with distinct questions, however phrased: the worked solution determines the expression."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        row = make_row(rng)
        if row["completion"] not in seen:
            seen.add(row["completion"])
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=REPO / "src/sftjuice/demo_data")
    parser.add_argument("--low-quality-fraction", type=float, default=0.0,
                        help="share of training rows replaced by a corrupted demonstration")
    args = parser.parse_args()

    rows = generate(args.train_rows + args.test_rows, args.seed)
    train, test = rows[: args.train_rows], rows[args.train_rows:]
    if args.low_quality_fraction > 0:
        sys.path.insert(0, str(REPO / "src"))  # imported here: the clean files need no dependency
        from sftjuice.verifiers import corrupt_steps

        rng = random.Random(args.seed + 1)
        for i in rng.sample(range(len(train)), round(args.low_quality_fraction * len(train))):
            train[i] = corrupt_steps(train[i], rng)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in (("train", train), ("test", test)):
        path = args.out_dir / f"{TASK}.{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
        print(f"{path}: {len(split_rows)} rows")


if __name__ == "__main__":
    main()
