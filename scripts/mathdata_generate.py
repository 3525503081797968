"""Write sftjuice demo data with DeepMind's ``mathematics_dataset`` generator.

Runs inside the separate venv that ``scripts/make_demo_data.sh`` sets up
(``mathematics-dataset==1.0.1`` needs ``sympy==1.5``, which clashes with the
sympy torch wants), so it must not import anything from ``sftjuice``.

For every requested ``<module>:<difficulty>`` it builds the generator's own
training modules for that difficulty (``train-easy`` / ``train-medium`` /
``train-hard`` are the three thirds of the module's training entropy range,
exactly as ``mathematics_dataset.generate_to_file --train_split`` does;
``train`` is the whole range and ``interpolate`` the generator's test
setting), samples problems with a seeded RNG, drops the ones the generator
itself would drop (question > 160 or answer > 30 characters), deduplicates by
question text and writes the first ``--train`` unique problems to
``<module>.train.jsonl`` and the next ``--test`` ones to
``<module>.test.jsonl``. Prompt and completion are the generator's question
and answer strings, untouched.

Every task gets its own RNG seed derived from ``--seed`` and the task name, so
a task's rows do not depend on which other tasks are generated or in which
order.
"""

import argparse
import json
import os
import random
import sys
import zlib

import numpy as np

from mathematics_dataset import generate
from mathematics_dataset import generate_settings
from mathematics_dataset.modules import modules

DIFFICULTY_LEVELS = {"easy": 0, "medium": 1, "hard": 2}

DEFAULT_TASKS = (
    "comparison__sort:easy",
    "arithmetic__add_or_sub:easy",
    "numbers__round_number:easy",
    "comparison__closest:easy",
    "arithmetic__add_sub_multiple:easy",
    "numbers__place_value:easy",
    "algebra__linear_1d:easy",
)


def _flatten(tree, prefix=None, out=None):
    out = {} if out is None else out
    for key, value in tree.items():
        name = key if prefix is None else prefix + "__" + key
        if isinstance(value, dict):
            _flatten(value, name, out)
        else:
            out[name] = value
    return out


def module_table(difficulty):
    """All generator modules (flat ``area__name`` -> callable) for a difficulty."""
    if difficulty in DIFFICULTY_LEVELS:
        entropy_fn = generate._make_entropy_fn(DIFFICULTY_LEVELS[difficulty], 3)
        return _flatten(modules.train(entropy_fn))
    if difficulty == "train":
        return _flatten(modules.train(generate._make_entropy_fn(0, 1)))
    if difficulty == "interpolate":
        return _flatten(modules.test())
    raise SystemExit("unknown difficulty %r (easy, medium, hard, train, interpolate)"
                     % difficulty)


def task_seed(seed, task):
    return (seed * 1000003 + zlib.crc32(task.encode("utf-8"))) % (2 ** 32)


def sample_unique(module, count, max_draws):
    """``count`` problems with distinct questions, in generation order."""
    seen = set()
    rows = []
    draws = 0
    while len(rows) < count:
        if draws >= max_draws:
            raise SystemExit("only %d unique questions after %d draws (wanted %d)"
                             % (len(rows), draws, count))
        draws += 1
        problem = module()
        question = str(problem.question)
        answer = str(problem.answer)
        # Same filter as mathematics_dataset.generate.sample_from_module.
        if len(question) > generate_settings.MAX_QUESTION_LENGTH:
            continue
        if len(answer) > generate_settings.MAX_ANSWER_LENGTH:
            continue
        if question in seen:
            continue
        seen.add(question)
        rows.append((question, answer))
    return rows, draws


def write_jsonl(path, rows, task, difficulty):
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for question, answer in rows:
            record = {"prompt": question, "completion": answer,
                      "task": task, "difficulty": difficulty}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--max-draws-factor", type=int, default=20,
                        help="give up after (train+test)*factor draws")
    parser.add_argument("tasks", nargs="*", default=list(DEFAULT_TASKS),
                        help="module:difficulty, e.g. comparison__sort:easy")
    args = parser.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    tables = {}
    for spec in args.tasks:
        task, _, difficulty = spec.partition(":")
        difficulty = difficulty or "easy"
        if difficulty not in tables:
            tables[difficulty] = module_table(difficulty)
        table = tables[difficulty]
        if task not in table:
            raise SystemExit("unknown module %r; known: %s"
                             % (task, ", ".join(sorted(table))))
        seed = task_seed(args.seed, task)
        random.seed(seed)
        np.random.seed(seed)
        total = args.train + args.test
        rows, draws = sample_unique(table[task], total,
                                    total * args.max_draws_factor)
        base = os.path.join(args.out_dir, task)
        write_jsonl(base + ".train.jsonl", rows[:args.train], task, difficulty)
        write_jsonl(base + ".test.jsonl", rows[args.train:], task, difficulty)
        print("%-32s %-6s seed=%-10d draws=%-6d train=%d test=%d"
              % (task, difficulty, seed, draws, args.train, args.test),
              file=sys.stderr)


if __name__ == "__main__":
    main()
