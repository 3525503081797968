"""Command line: ``sftjuice {demo,train,generate,eval,reward} [options]``; ``sftjuice COMMAND --help``."""

from __future__ import annotations

import logging
import os
import sys

from .config import GenerateConfig, SftjuiceError, TrainConfig, parse_args

USAGE = """usage: sftjuice [--quiet] COMMAND [options]   (sftjuice COMMAND --help for the options)

--quiet: no progress bars and warnings only (bars also hide when output is not a terminal)

commands:
  demo       the whole idea on the default model, in minutes on a CPU
  train      train a policy from demonstrations (--method sft | ...)
  generate   sample responses for prompts, with their token log-probs
  reward     score prompt/response files with a learned reward model (sftjuice reward score)
  eval       judge models: accuracy, mean score, win rate (--judge verifier | loglik | DIR), log-prob gap (--judge gap)
"""


def say(line: str) -> None:
    """Print ``line`` to stderr in one write: the processes of an ``accelerate launch`` share
    one stderr, and print's separate write of the newline lets their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    import datasets

    datasets.utils.logging.disable_progress_bar()


def cmd_train(argv: list[str]) -> None:
    from .api import train

    print(f"trained model: {train(parse_args(TrainConfig, argv, prog='sftjuice train'))}")


def cmd_generate(argv: list[str]) -> None:
    from .generation import generate_file

    cfg = parse_args(GenerateConfig, argv, prog="sftjuice generate")
    print(f"samples: {generate_file(cfg)}")


def cmd_demo(argv: list[str]) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(parse_args(DemoConfig, argv, prog="sftjuice demo"))


def cmd_reward(argv: list[str]) -> None:
    from .config import RewardScoreConfig
    from .evaluation import score_file

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
    quiet = bool(argv) and argv[0] == "--quiet"
    argv = argv[1:] if quiet else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        say(f"sftjuice: unknown command '{command}'\n\n{USAGE}")
        return 2
    from . import stopping

    if command == "train":  # before torch loads: a stop signal during start-up stops the run too
        stopping.COMMAND_LINE = ["sftjuice", *argv]  # for the --resume command a stopped run prints
        stopping.install_stop_handlers()
    try:
        return _run(command, rest, quiet)
    except stopping.RunStopped as e:  # a stop signal, divergence, a folder in use: one line, a status of its own
        say(f"sftjuice {command}: {' '.join(str(e).split())}")
        return e.status
    finally:
        stopping.uninstall_stop_handlers()  # an in-process caller gets its handlers back


def _run(command: str, rest: list[str], quiet: bool) -> int:
    rank = int(os.environ.get("RANK", "0"))
    from . import progress

    progress.QUIET = quiet
    logging.basicConfig(level=logging.INFO if rank == 0 and not quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries()
    from safetensors import SafetensorError

    from .storage import os_error_message, write_error_message

    try:
        try:
            COMMANDS[command](rest)
        except BaseException:
            from tqdm import tqdm

            for bar in list(tqdm._instances):  # end a failed run's progress bar before the error line
                try:
                    bar.close()
                except Exception:  # noqa: BLE001 - the error itself matters, not its progress bar
                    pass
            raise
    except SftjuiceError as e:  # bad input or option: one line (messages with newlines are joined)
        say(f"sftjuice {command}: error: {' '.join(str(e).split())}")
        return 2
    except KeyboardInterrupt:
        say(f"sftjuice {command}: interrupted")
        return 130
    except OSError as e:  # permission denied, read-only or full file system, ...: one line naming the path
        say(f"sftjuice {command}: error: {os_error_message(e)}")
        return 1
    except (RuntimeError, SafetensorError) as e:
        # torch.save and safetensors report a failed write (a full disk) as RuntimeError /
        # SafetensorError without the path; storage.write_error_message recognises those
        # (and only those: anything else is a bug and keeps its traceback)
        message = write_error_message(e)
        if message is None:
            raise
        say(f"sftjuice {command}: error: {message}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
