"""Judging policies on held-out prompts: a verifier for checkable answers, the
log-likelihood of reference answers, a reward model, the log-prob gap on preference pairs,
and the statistics (confidence intervals, win rates). ``sftjuice eval`` is :func:`run_eval`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

from .config import ModelConfig, RewardScoreConfig, SamplingConfig, SftjuiceError, require
from .data import ChatFormat, DataError, Demonstration, check_messages, check_prompt, text_of, load_demonstrations, load_rows
from .generation import sample
from .models import load_policy, load_reward_model, load_tokenizer, resolve_model, stop_token_ids, use_bf16
from .report import markdown_table, plot_lines, text_table, write_json
from .scoring import rewards_of, sequence_logprobs_of, singletons
from .storage import atomic_write_text, write_jsonl
from . import verifiers
from .verifiers import load_verifier

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- statistics


@dataclass
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def proportion(successes: int, n: int, z: float = 1.96) -> Estimate:
    """Wilson score interval: sound at 0% and 100%, unlike the normal approximation."""
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)  # (rounding: -1e-17 at 0%)


def mean_interval(values: list[float], z: float = 1.96) -> Estimate:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Estimate(m, m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n), n)


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self) -> Estimate:
        """Win rate among decided comparisons (ties counted apart)."""
        return proportion(self.wins, self.wins + self.losses)


def compare(scores: list[float], baseline: list[float], tol: float = 1e-9) -> WinRate:
    wins = sum(a > b + tol for a, b in zip(scores, baseline))
    losses = sum(b > a + tol for a, b in zip(scores, baseline))
    return WinRate(wins, len(scores) - wins - losses, losses)


# --------------------------------------------------------------- model judgements


def greedy_responses(model, chat: ChatFormat, demos: list[Demonstration], max_new_tokens: int,
                     bf16: bool = False) -> list[str]:
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)  # the sampler's default decode batch
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    out = sample(model, prompts, cfg, chat.stop_token_ids, chat.tokenizer.pad_token_id, seed=0, bf16=bf16)
    return [chat.decode(ss[0].token_ids) for ss in out]


def answer_logprobs(model, chat: ChatFormat, demos: list[Demonstration], batch_size: int = 16) -> list[float]:
    """Per-token log-likelihood of each reference answer (moves before accuracy does)."""
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    answers = [chat.completion_ids(d.prompt, d.completion) for d in demos]
    sums = sequence_logprobs_of(model, chat.tokenizer.pad_token_id, prompts, singletons(answers), batch_size)
    return [s[0] / len(a) for s, a in zip(sums, answers)]


def logprob_pairs(model, chat: ChatFormat, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                  batch_size: int = 16) -> list[tuple[float, float]]:
    """(log pi(chosen|x), log pi(rejected|x)) for each (prompt, chosen, rejected) triple, each prompt computed once."""
    ids = [chat.prompt_ids(p) for p in prompts]
    groups = [[chat.completion_ids(p, c), chat.completion_ids(p, r)] for p, c, r in zip(prompts, chosen, rejected)]
    return [tuple(g) for g in sequence_logprobs_of(model, chat.tokenizer.pad_token_id, ids, groups, batch_size)]


def logprob_gaps(model, chat: ChatFormat, prompts: list[list[dict]], chosen: list[str], rejected: list[str],
                 batch_size: int = 16) -> list[float]:
    """log pi(chosen|x) - log pi(rejected|x) for each (prompt, chosen, rejected) triple."""
    return [c - r for c, r in logprob_pairs(model, chat, prompts, chosen, rejected, batch_size)]


def evaluate_model(model_dir, demos: list[Demonstration], max_new_tokens: int, verifier_name: str | None = None) -> dict:
    """What the demo and the benchmarks report for one model on held-out demonstrations:
    greedy accuracy by the verifier, the per-token log-likelihood of the reference answers,
    and the log-prob gap between each reference answer and a wrong one (the next held-out
    question's answer), the paper's measure of what separates good responses from bad."""
    model, chat = load_judged(model_dir, ModelConfig())
    responses = greedy_responses(model, chat, demos, max_new_tokens)
    verifier = load_verifier(verifier_name)
    correct = [verifier(question(d), r, reference_answer(d)) >= 0.5 for r, d in zip(responses, demos)]
    wrong = [demos[(i + 1) % len(demos)].completion for i in range(len(demos))]
    pairs = logprob_pairs(model, chat, [d.prompt for d in demos], [d.completion for d in demos], wrong)
    lengths = [len(chat.completion_ids(d.prompt, d.completion)) for d in demos]
    return {"accuracy": vars(proportion(sum(correct), len(correct))),
            "answer_logprob": vars(mean_interval([right / n for (right, _), n in zip(pairs, lengths)])),
            "logprob_gap": vars(mean_interval([right - other for right, other in pairs])),
            "correct": correct, "responses": responses}


# ------------------------------------------------------------- pairs and responses


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str


@dataclass
class Response:
    text: str
    token_ids: list[int] | None = None  # as the policy sampled them; None when read from a file
    finished: bool = True  # False: cut at the length limit, so re-rendered without an end-of-turn token


def _prompt_of(row: dict) -> list[dict]:
    """A row's ``prompt``: a string (one user turn) or chat messages, as in data.py."""
    if "prompt" not in row:
        raise ValueError("prompt", "missing")
    p = row["prompt"]
    if isinstance(p, str):
        if not p.strip():
            raise ValueError("prompt", "empty")
        return [{"role": "user", "content": p}]
    return check_prompt(check_messages(p, "prompt"), "prompt")


def parse_pair(row, source: str) -> Pair:
    """Validate one ``{"prompt", "chosen", "rejected"}`` row; raises ValueError(field, reason)."""
    if not isinstance(row, dict):
        raise ValueError("<row>", f"expected a JSON object, got {type(row).__name__}")
    prompt = _prompt_of(row)
    texts = []
    for name in ("chosen", "rejected"):
        if name not in row:
            raise ValueError(name, "missing")
        texts.append(text_of(row[name], name))
        if not texts[-1].strip():
            raise ValueError(name, "empty")
    return Pair(prompt, texts[0], texts[1], source)


def _parse_response(row, source: str) -> tuple[list[dict], Response]:
    if not isinstance(row, dict):
        raise ValueError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("completion"), str):  # may be empty: a model can answer with nothing
        raise ValueError("completion", "missing or not a string")
    if not isinstance(row.get("finished", True), bool):  # sftjuice generate writes it
        raise ValueError("finished", "expected true or false")
    return _prompt_of(row), Response(row["completion"], finished=row.get("finished", True))


def load_pairs(path, skip_invalid: bool = False) -> list[Pair]:
    return load_rows(path, parse_pair, skip_invalid)


def _key(prompt: list[dict]) -> str:
    return json.dumps(prompt, ensure_ascii=False)


def read_responses(path, demos: list[Demonstration]) -> list[list[Response]]:
    """Responses generated elsewhere: prompt/completion rows (``sftjuice generate`` writes
    them), matched to ``demos`` by prompt; all rows of one prompt are its samples."""
    by_prompt: dict[str, list[Response]] = {}
    for prompt, response in load_rows(path, _parse_response, skip_invalid=False):
        by_prompt.setdefault(_key(prompt), []).append(response)
    missing = [d.source for d in demos if _key(d.prompt) not in by_prompt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{path}: no response for the prompt of {missing[0]}{more}")
    return [by_prompt[_key(d.prompt)] for d in demos]


# ------------------------------------------------------------------------ judges


def reference_answer(d: Demonstration) -> str:
    """What the verifier checks against: the row's ``answer`` field, else its demonstration's final answer."""
    try:
        return verifiers.reference_answer(d.extra, d.completion)
    except SftjuiceError:
        raise DataError(f"{d.source}: field 'answer': the verifier needs an 'answer' field or a completion") from None


def question(d: Demonstration) -> str:
    """The prompt text a verifier sees: the last user message."""
    return next((m["content"] for m in reversed(d.prompt) if m["role"] == "user"), "")


def held_out_scores(model, chat: ChatFormat, demos: list[Demonstration], verify=None, max_new_tokens: int = 128,
                    bf16: bool = False) -> list[tuple[float, bool | None]]:
    """(the reference answer's per-token NLL, whether ``verify`` accepts the greedy answer, or
    None without a verifier) for each held-out demonstration: what early stopping judges."""
    nll = [-lp for lp in answer_logprobs(model, chat, demos)]
    if verify is None:
        return [(x, None) for x in nll]
    answers = greedy_responses(model, chat, demos, max_new_tokens, bf16=bf16)
    return [(x, verify(question(d), a, reference_answer(d)) >= 0.5) for x, a, d in zip(nll, answers, demos)]


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


class RewardJudge:
    """``r(x, y)`` of a sequence-classification directory with one label: an RFT run's
    ``reward_model/`` or any HF classifier.

    It scores what the policy saw: the prompt rendered with the policy's chat template
    (``ChatFormat.prompt_ids``) followed by the response's sampled token ids. Responses are
    re-rendered from their text (``ChatFormat.completion_ids``, ending at the end-of-turn
    token) in two cases: the directory ships a tokenizer that differs from the policy's
    (vocabulary or chat template), which then renders prompt and response, since the
    reward model reads its own tokens; or the responses come from a file and carry no ids
    (rendered by the reward model's tokenizer, or the policy's if it ships none)."""

    def __init__(self, name: str, batch_size: int):
        path = resolve_model(name)
        self.chat = ChatFormat(load_tokenizer(path)) if (path / "tokenizer_config.json").exists() else None
        self.model = load_reward_model(path, self.chat.tokenizer.pad_token_id if self.chat else None)
        self.batch_size = batch_size

    def score(self, demos: list[Demonstration], responses: list[list[Response]],
              policy_chat: ChatFormat | None) -> list[list[float]]:
        """Scores per prompt and sample; ``policy_chat`` may be None only if the directory has a tokenizer."""
        use_policy = policy_chat is not None and (
            self.chat is None or same_tokenizer(self.chat.tokenizer, policy_chat.tokenizer))
        chat = policy_chat if use_policy else self.chat
        prompts, completions = [], []
        for d, rs in zip(demos, responses):
            p = chat.prompt_ids(d.prompt)
            for r in rs:
                prompts.append(p)
                sampled = use_policy and r.token_ids is not None
                completions.append(r.token_ids if sampled else chat.completion_ids(d.prompt, r.text, r.finished))
        flat = iter(x[0] for x in rewards_of(self.model, prompts, singletons(completions), self.batch_size))
        return [[next(flat) for _ in rs] for rs in responses]


def load_judged(name, cfg: ModelConfig):
    """A policy to judge, in eval mode, with its chat format."""
    path = resolve_model(str(name))
    model = load_policy(cfg, path, trainable=False)
    return model, ChatFormat(load_tokenizer(path), stop_token_ids(model), cfg.chat_template)


def sampled_responses(model, chat: ChatFormat, demos: list[Demonstration], cfg) -> list[list[Response]]:
    prompts = [chat.prompt_ids(d.prompt) for d in demos]
    out = sample(model, prompts, cfg, chat.stop_token_ids, chat.tokenizer.pad_token_id, seed=cfg.seed, bf16=use_bf16(cfg.bf16))
    return [[Response(chat.decode(s.token_ids), s.token_ids, s.finished) for s in ss] for ss in out]


def judge_model(cfg, name: str | None, responses_file: str | None, demos: list[Demonstration],
                references: list[str | None], reward: RewardJudge | None
                ) -> tuple[list[list[str]] | None, list[list[float]]]:
    """One model's responses (None for ``loglik``, which scores the references) and their
    scores, per prompt and sample."""
    if cfg.judge == "loglik":
        model, chat = load_judged(name, cfg)
        return None, [[s] for s in answer_logprobs(model, chat, demos, cfg.batch_size)]
    chat = None
    if responses_file:
        responses = read_responses(responses_file, demos)
    else:
        model, chat = load_judged(name, cfg)
        responses = sampled_responses(model, chat, demos, cfg)
    texts = [[r.text for r in rs] for rs in responses]
    if reward is None:
        verifier = load_verifier(cfg.verifier)
        return texts, [[float(verifier(question(d), t, ref)) for t in ts] for d, ts, ref in zip(demos, texts, references)]
    if chat is None and reward.chat is None:  # file responses, and only the policy's template renders them
        chat = ChatFormat(load_tokenizer(resolve_model(name or cfg.model)), template=cfg.chat_template)
    return texts, reward.score(demos, responses, chat)


# ----------------------------------------------------------------- the eval command

JUDGES = ("verifier", "loglik", "gap")
SCORE_NAMES = {"verifier": "accuracy", "loglik": "reference log-prob / token"}


def accuracy(correct: list[list[float]]) -> Estimate:
    """Share of correct responses: Wilson over prompts with one response each; with several
    samples per prompt, a normal interval over the prompts' shares (samples of one prompt
    are not independent)."""
    if all(len(c) == 1 for c in correct):
        return proportion(int(sum(c[0] for c in correct)), len(correct))
    return mean_interval([sum(c) / len(c) for c in correct])


def outcome(score: float, baseline: float) -> str:
    w = compare([score], [baseline])
    return "win" if w.wins else "loss" if w.losses else "tie"


def as_json(e: Estimate) -> dict:
    """An estimate as valid JSON (NaN, e.g. a win rate with no decided prompt, -> null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in vars(e).items()}


def decoding(cfg) -> str:
    if cfg.temperature == 0:
        return "greedy decoding"
    return f"sampling (temperature {cfg.temperature}, top-p {cfg.top_p}, {cfg.num_samples} per prompt)"


def check_is_model(name: str | None, flag: str) -> None:
    if name and is_run_dir(Path(name).expanduser()):
        raise SftjuiceError(f"{flag} {name} is a training output folder: judge its model with {flag} "
                            f"{Path(name) / 'final'} (--judge gap walks every checkpoint of a folder)")


def judge_eval(cfg) -> tuple[dict, list[dict], list[str], str]:
    """Accuracy, mean score and win rate of --model (over --baseline) under a verifier,
    the reference log-likelihood, or a reward model."""
    require(cfg, "data")
    if cfg.temperature == 0 and cfg.num_samples > 1:
        raise SftjuiceError("--num-samples > 1 needs --temperature > 0 (greedy decoding gives one response)")
    if cfg.judge == "loglik" and (cfg.responses or cfg.baseline_responses):
        raise SftjuiceError("--judge loglik scores the reference completions, not responses: drop --responses")
    check_is_model(cfg.model, "--model")
    check_is_model(cfg.baseline, "--baseline")
    demos = load_demonstrations(cfg.data, cfg.skip_invalid, require_completion=False)
    if cfg.judge == "verifier":
        references = [reference_answer(d) for d in demos]
    else:
        references = [d.completion for d in demos]
        if cfg.judge == "loglik" and None in references:
            source = demos[references.index(None)].source
            raise DataError(f"{source}: field 'completion': --judge loglik needs a reference completion")
    reward = None
    if cfg.judge not in JUDGES:
        try:
            reward = RewardJudge(cfg.judge, cfg.batch_size)
        except SftjuiceError as e:
            raise SftjuiceError(f"--judge is verifier, loglik, gap or a reward-model directory: {e}") from None

    judged = {}
    for role, name, file in (("model", cfg.model, cfg.responses), ("baseline", cfg.baseline, cfg.baseline_responses)):
        if name or file:
            log.info("judging %s %s", role, file or name)
            texts, scores = judge_model(cfg, name, file, demos, references, reward)
            judged[role] = {"name": str(file or name), "texts": texts, "scores": scores,
                            "per_prompt": [sum(s) / len(s) for s in scores]}
    return judge_report(cfg, demos, references, judged)


def judge_report(cfg, demos: list[Demonstration], references: list[str | None],
                 judged: dict[str, dict]) -> tuple[dict, list[dict], list[str], str]:
    """eval.json's content, the table's rows and columns, and its title."""
    result = {"judge": cfg.judge, "data": cfg.data, "prompts": len(demos),
              "decoding": None if cfg.judge == "loglik" else decoding(cfg)}
    score_name = SCORE_NAMES.get(cfg.judge, "mean reward")
    rows = []
    for role, j in judged.items():
        # the verifier's score is correctness, so its mean is the accuracy
        score = accuracy(j["scores"]) if cfg.judge == "verifier" else mean_interval(j["per_prompt"])
        result[role] = {"name": j["name"], "score": as_json(score)}
        if cfg.judge == "verifier":
            result[role]["accuracy"] = as_json(score)
        rows.append({"model": f"{role}: {j['name']}", score_name: str(score)})
    if "baseline" in judged:
        win = compare(judged["model"]["per_prompt"], judged["baseline"]["per_prompt"])
        result["win_rate"] = {"wins": win.wins, "ties": win.ties, "losses": win.losses, "rate": as_json(win.rate())}
        rows[0].update({"win rate": str(win.rate()) if win.wins + win.losses else "n/a (all ties)",
                        "wins / ties / losses": f"{win.wins} / {win.ties} / {win.losses}"})
    result["records"] = []
    for i, d in enumerate(demos):
        record = {"source": d.source, "prompt": d.prompt, "reference": references[i]}
        for role, j in judged.items():
            record[role] = {"score": j["per_prompt"][i], "scores": j["scores"][i],
                            **({"responses": j["texts"][i]} if j["texts"] is not None else {})}
        if "baseline" in judged:
            record["outcome"] = outcome(judged["model"]["per_prompt"][i], judged["baseline"]["per_prompt"][i])
        result["records"].append(record)

    columns = ["model", score_name] + (["win rate", "wins / ties / losses"] if "baseline" in judged else [])
    header = (f"sftjuice eval: --judge {cfg.judge} on {len(demos)} prompts of {cfg.data}"
              + (f", {decoding(cfg)}" if cfg.judge != "loglik" else "")
              + "; 95% intervals; win rate = wins / (wins + losses) of --model over --baseline per prompt, ties apart")
    return result, rows, columns, header


# ------------------------------------------------------------------ log-prob gap


def is_run_dir(path: Path) -> bool:
    """A training output folder (config.yaml beside checkpoints/ or final/)."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "final").is_dir())


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def run_model_config(run: Path) -> ModelConfig:
    """The model options a training run was started with (its config.yaml)."""
    import yaml

    raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return ModelConfig(**{f.name: raw[f.name] for f in fields(ModelConfig) if f.name in raw})


def load_checkpoint_policy(checkpoint: Path, start: Path, run_cfg: ModelConfig, cfg: ModelConfig):
    """The policy of ``checkpoints/step-N``: accelerate's ``model.safetensors`` is the state
    dict of the model the run trained, so it loads into the starting model, with LoRA into
    the same adapter structure (a full peft state dict). Tied weights are stored once."""
    from safetensors.torch import load_file

    model = load_policy(run_cfg, start, trainable=run_cfg.lora)
    state = load_file(checkpoint / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise SftjuiceError(f"{checkpoint}: the weights do not fit the run's starting model {start} "
                            f"(missing {untied[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, ChatFormat(load_tokenizer(start), stop_token_ids(model), run_cfg.chat_template)


def policies(name: str, cfg: ModelConfig) -> list[tuple[str, int | None, object]]:
    """(label, step, loader) of what ``name`` stands for: one model, or for a training
    output folder its starting model (step 0), every checkpoint and ``final/``."""
    run = Path(name).expanduser()
    if not is_run_dir(run):
        return [(name, None, partial(load_judged, name, cfg))]
    run_cfg = run_model_config(run)
    start = resolve_model(run_cfg.model)
    checkpoints = sorted(run.glob("checkpoints/step-*"), key=step_of)
    out = [(f"{run.name} start", 0, partial(load_judged, start, cfg))]
    out += [(f"{run.name} step {step_of(c)}", step_of(c), partial(load_checkpoint_policy, c, start, run_cfg, cfg))
            for c in checkpoints]
    if (run / "final").is_dir():  # every method checkpoints at its end, so final/ sits on the last step
        out.append((f"{run.name} final", step_of(checkpoints[-1]) if checkpoints else None,
                    partial(load_judged, run / "final", cfg)))
    return out


def gap_eval(cfg) -> tuple[dict, list[dict], list[str], str]:
    """Mean ``log pi(chosen|x) - log pi(rejected|x)`` on --pairs for each model, or each
    checkpoint of a training folder (the paper's Figure 1, right)."""
    require(cfg, "pairs")
    pairs = load_pairs(cfg.pairs, cfg.skip_invalid)
    prompts, chosen, rejected = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    results, gaps = [], []
    for role, name in (("model", cfg.model), ("baseline", cfg.baseline)):
        for label, step, load in policies(name, cfg) if name else []:
            log.info("log-prob gap of %s", label)
            model, chat = load()
            g = logprob_gaps(model, chat, prompts, chosen, rejected, cfg.batch_size)
            results.append({"role": role, "name": label, "step": step, "gap": mean_interval(g),
                            "chosen_preferred": proportion(sum(x > 0 for x in g), len(g))})
            gaps.append(g)
    rows = [{"model": f"{r['role']}: {r['name']}", "step": "" if r["step"] is None else r["step"],
             "log-prob gap": str(r["gap"]), "chosen preferred": str(r["chosen_preferred"])} for r in results]
    result = {"judge": "gap", "pairs": cfg.pairs, "n": len(pairs),
              "results": [{k: as_json(v) if isinstance(v, Estimate) else v for k, v in r.items()} for r in results],
              "records": [{"source": p.source, "gaps": [g[i] for g in gaps]} for i, p in enumerate(pairs)]}
    header = (f"sftjuice eval: log pi(chosen) - log pi(rejected) on {len(pairs)} pairs of {cfg.pairs}; "
              "95% intervals; 'chosen preferred' = share of pairs with a positive gap")
    return result, rows, ["model", "step", "log-prob gap", "chosen preferred"], header


def plot_gap(path: Path, results: list[dict], names: dict[str, str]) -> bool:
    """The gap against the step for training folders (``results`` as in eval.json, ``names``
    the --model/--baseline values); a single model is a flat line across. Nothing to plot
    without a training folder."""
    stepped = [r for r in results if r["step"] is not None]
    if not stepped:
        return False
    lo, hi = min(r["step"] for r in stepped), max(r["step"] for r in stepped)
    series = []
    for role in ("model", "baseline"):
        curve = sorted((r for r in stepped if r["role"] == role), key=lambda r: r["step"])
        if curve:
            series.append((f"{role}: {names[role]}", [r["step"] for r in curve],
                           [r["gap"]["mean"] for r in curve], [(r["gap"]["low"], r["gap"]["high"]) for r in curve]))
        for r in results:
            if r["role"] == role and r["step"] is None:
                series.append((f"{role}: {r['name']}", [lo, hi], [r["gap"]["mean"]] * 2,
                               [(r["gap"]["low"], r["gap"]["high"])] * 2))
    plot_lines(path, series, xlabel="optimiser step", ylabel="log pi(chosen) - log pi(rejected)",
               title="log-prob gap on preference pairs (95% intervals)")
    return True


def run_eval(cfg) -> list[Path]:
    """``sftjuice eval``: judge, print a table, write OUTPUT/eval.json and OUTPUT/eval.md
    (and OUTPUT/gap.png for a training folder under --judge gap); returns the files written."""
    require(cfg, "output")
    out = Path(cfg.output)
    result, rows, columns, header = gap_eval(cfg) if cfg.judge == "gap" else judge_eval(cfg)
    write_json(out / "eval.json", result)
    atomic_write_text(out / "eval.md", f"# {header}\n\n" + markdown_table(rows, columns))
    written = [out / "eval.json", out / "eval.md"]
    if cfg.judge == "gap" and plot_gap(out / "gap.png", result["results"], {"model": cfg.model, "baseline": cfg.baseline}):
        written.append(out / "gap.png")
    print("\n" + header + "\n\n" + text_table(rows, columns) + "\n")
    return written


# ------------------------------------------------------------ sftjuice reward score


def score_file(cfg: RewardScoreConfig) -> Path:
    """``sftjuice reward score``: each prompt/response row of a file, with its learned reward."""
    require(cfg, "reward_model", "data", "output")
    demos = load_demonstrations(cfg.data, cfg.skip_invalid)
    path = resolve_model(cfg.reward_model)
    model = load_reward_model(path)
    chat = ChatFormat(load_tokenizer(path))  # the template the reward model was trained with, saved beside it
    examples = chat.encode(demos, cfg.max_prompt_length, cfg.max_length, cfg.skip_invalid)
    scores = rewards_of(model, [e.prompt_ids for e in examples], singletons([e.completion_ids for e in examples]),
                        cfg.batch_size)
    rows = [{"prompt": demos[e.index].prompt, "completion": demos[e.index].completion, **demos[e.index].extra, "reward": s[0]}
            for e, s in zip(examples, scores)]
    out = Path(cfg.output)
    write_jsonl(out, rows)
    return out
