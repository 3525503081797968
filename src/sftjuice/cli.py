"""Command line: ``sftjuice {demo,train,generate,eval,reward} [options]``; ``sftjuice COMMAND --help``."""

from __future__ import annotations

import logging
import os
import sys

from .config import GenerateConfig, SftjuiceError, TrainConfig, parse_args

USAGE = """usage: sftjuice COMMAND [options]   (sftjuice COMMAND --help for the options)

commands:
  demo       the whole idea on the default model, in minutes on a CPU
  train      train a policy from demonstrations (--method sft | ...)
  generate   sample responses for prompts, with their token log-probs
  reward     score prompt/response files with a learned reward model (sftjuice reward score)
  eval       judge models: accuracy, mean score, win rate (--judge verifier | loglik | DIR), log-prob gap (--judge gap)
"""


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    import datasets

    datasets.utils.logging.disable_progress_bar()


def cmd_train(argv: list[str]) -> None:
    from .algorithms import METHODS

    cfg = parse_args(TrainConfig, argv, prog="sftjuice train")
    final = METHODS[cfg.method](cfg)
    print(f"trained model: {final}")


def cmd_generate(argv: list[str]) -> None:
    from .generation import generate_file

    cfg = parse_args(GenerateConfig, argv, prog="sftjuice generate")
    print(f"samples: {generate_file(cfg)}")


def cmd_demo(argv: list[str]) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(parse_args(DemoConfig, argv, prog="sftjuice demo"))


def cmd_reward(argv: list[str]) -> None:
    from .algorithms.rft import score_file
    from .config import RewardScoreConfig

    if not argv or argv[0] != "score":
        raise SftjuiceError("usage: sftjuice reward score --reward-model DIR --data FILE --output FILE.jsonl")
    cfg = parse_args(RewardScoreConfig, argv[1:], prog="sftjuice reward score")
    print(f"scores: {score_file(cfg)}")


def cmd_eval(argv: list[str]) -> None:
    from .config import EvalConfig
    from .evaluation import run_eval

    cfg = parse_args(EvalConfig, argv, prog="sftjuice eval")
    print("results: " + ", ".join(str(p) for p in run_eval(cfg)))


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "generate": cmd_generate, "reward": cmd_reward, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sftjuice: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries()
    try:
        COMMANDS[command](rest)
    except SftjuiceError as e:
        print(f"sftjuice {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sftjuice {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
