"""The Python API as the README shows it, and the per-method configs' checks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sftjuice.cli import main
from sftjuice.config import SFTConfig

from .conftest import REPO, read_metrics, run_cli, write_jsonl


def test_the_readme_example_runs(tiny_model_dir, demo_file, tmp_path, monkeypatch):
    """The README's Python block, run as written with the tiny model and data put in place."""
    from transformers import AutoModelForCausalLM

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    code = block.replace('"runs/sft/final"', repr(str(tiny_model_dir))).replace('"demos.jsonl"', repr(str(demo_file)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    for out in ("runs/irft", "runs/irft-mem"):
        assert (tmp_path / out / "final" / "config.json").exists()
        AutoModelForCausalLM.from_pretrained(tmp_path / out / "final")
    assert scope["final"] == tmp_path / "runs/irft-mem/final" or str(scope["final"]).endswith("runs/irft-mem/final")


def test_runs_of_either_precision_follow_each_other_in_one_process(tiny_model_dir, demo_file, tmp_path):
    """accelerate keeps one precision per process; a second train() with another --bf16 must still run in it."""
    from sftjuice import train

    for precision in ("false", "true", "false"):
        out = tmp_path / precision / str(len(list(tmp_path.iterdir())))
        train(SFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(out), epochs=0.25, bf16=precision))
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps and (out / "final" / "config.json").exists()


METHODS = ["sft", "irft", "spin", "rft", "srppo", "rso", "steps", "rest"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_no_tuning_flags(method, wrong_task_model_dir, tmp_path):
    """Only --model, --data and --output, as a user starts: --model is the final/ of an sftjuice
    SFT run (whose manifest names its base, which srppo and rso's implicit reward need) and the
    data is four rows of the task it learned, so its answers end and some verify (rest trains
    on those; rso needs candidates whose rewards differ). Every default is the method's own."""
    from safetensors.torch import load_file

    rows = (REPO / "src/sftjuice/demo_data/numbers__place_value.train.jsonl").read_text().splitlines()[:4]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o"
    args = ["train", "--method", method, "--model", wrong_task_model_dir, "--data", data, "--output", out]
    if method == "rso":  # its default reward is a reward model, which no SFT run names: one line says so
        refused = run_cli(*args, check=False)
        assert refused.returncode == 2 and not out.exists()
        assert refused.stderr.strip().splitlines()[-1] == (
            "sftjuice train: error: --method rso needs --reward-model DIR (a sequence-classification reward with the "
            "policy's tokenizer, e.g. an RFT run's OUTPUT/reward_model), or --reward implicit")
        args += ["--reward", "implicit"]
    done = run_cli(*args)
    assert done.stdout.strip().splitlines()[-1] == f"trained model: {out / 'final'}"
    assert json.loads((out / "manifest.json").read_text())["method"] == method
    steps = [m for m in read_metrics(out) if "event" not in m]
    assert steps and all(math.isfinite(m["loss"]) for m in steps)
    start, end = load_file(wrong_task_model_dir / "model.safetensors"), load_file(out / "final/model.safetensors")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)  # it stepped


@pytest.mark.parametrize("argv, message", [
    (["--method", "sft", "--beta", "0.5"], "--beta is not used by --method sft; methods that take it: irft, spin, steps, rso"),
    (["--method", "spin", "--rounds", "3"], "--rounds is not used by --method spin; methods that take it: irft, rft, srppo, steps, rest, rso"),
    (["--method", "irft", "--top-p", "1.5"], "--top-p 1.5: must be > 0 and <= 1"),
    (["--method", "rft", "--num-samples", "1"], "--num-samples 1: must be >= 2"),
    (["--method", "irft", "--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
])
def test_train_options_are_checked_in_one_line(argv, message, capsys, tmp_path):
    assert main(["train", *argv, "--data", "d.jsonl", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"sftjuice train: error: {message}")  # later methods may follow in the list
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ issue 24: one declaration, one meaning

BEFORE_RENAMES = json.loads((REPO / "tests/data/method_defaults_before_issue24.json").read_text())
NEW_NAMES = {"rft": {"beta": "kl_coef"}, "rso": {"beta": "rejection_beta", "gamma": "beta"}}


ADDED_SINCE = {"reward_tokens": "all",  # srppo, rso: the implicit reward over every token, as before
               "pack": False,  # every method: the padded layout, as before
               # sft: early stopping, off without --eval-data (the others only act with it)
               "eval_data": None, "eval_size": 64, "patience": 2, "verifier": None, "max_new_tokens": 128}
# issue 25: defaults changed on purpose, to the plateau benchmark's arms and the learning rates
# it chose on validation
TUNED_SINCE = {"irft": {"learning_rate": 2e-6, "rounds": 2, "sft_weight": 1.0},
               "rft": {"learning_rate": 2e-6, "rounds": 2},
               "spin": {"learning_rate": 2e-6, "keep_previous_round": True, "sft_weight": 1.0},
               "rest": {"learning_rate": 2e-6, "rounds": 2},
               "steps": {"learning_rate": 2e-6, "rounds": 2, "sft_weight": 1.0}}


@pytest.mark.parametrize("method", sorted(BEFORE_RENAMES))
def test_every_method_keeps_its_defaults_under_the_new_names(method):
    """tests/data holds each method's defaults before options were declared once and renamed
    (and before issue 25's TUNED_SINCE)."""
    import dataclasses

    from sftjuice.config import METHOD_CONFIGS

    renames = NEW_NAMES.get(method, {})
    before = {renames.get(k, k): v for k, v in BEFORE_RENAMES[method].items()} | TUNED_SINCE.get(method, {})
    now = dataclasses.asdict(METHOD_CONFIGS[method]())
    assert {k: now[k] for k in before} == before
    # options added since, each with the default that keeps the old behaviour
    added = set(now) - set(before)
    assert {k: now[k] for k in added} == {k: v for k, v in ADDED_SINCE.items() if k in added}


@pytest.mark.parametrize("argv, message", [
    (["--method", "rso", "--gamma", "0.1"], "--gamma was renamed: use --beta (RSO's DPO coefficient)"),
    (["--method", "rft", "--beta", "0.05"], "--beta was renamed: use --kl-coef (RFT's per-token KL coefficient)"),
])
def test_an_old_option_name_points_to_the_new_one_in_one_line(argv, message, tmp_path, capsys):
    """From the real command line and from a --config file; nothing is created."""
    flag_run = run_cli("train", *argv, "--data", "d.jsonl", "--output", tmp_path / "o", check=False)
    assert flag_run.returncode == 2 and flag_run.stderr.strip().splitlines() == [f"sftjuice train: error: {message}"]
    method, (old, value) = argv[1], argv[2:]
    config = tmp_path / "c.yaml"
    config.write_text(f"method: {method}\n{old[2:]}: {value}\n")
    assert main(["train", "--config", str(config), "--data", "d.jsonl", "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"sftjuice train: error: {config}: {message}"]
    assert not (tmp_path / "o").exists()


def test_old_names_from_python_are_a_type_error():
    from sftjuice.config import RFTConfig, RSOConfig

    with pytest.raises(TypeError, match="beta"):
        RFTConfig(beta=0.05)
    with pytest.raises(TypeError, match="gamma"):
        RSOConfig(gamma=0.05)
    # RSO's --beta is now its DPO coefficient (the old --gamma), --rejection-beta the old --beta
    cfg = RSOConfig(beta=0.2, rejection_beta=2.0)
    assert (cfg.beta, cfg.rejection_beta) == (0.2, 2.0)


def test_policy_steps_is_one_option_zero_only_for_rft():
    """rft --policy-steps 0 trains the reward alone; srppo's reward does not train, so it refuses 0."""
    from sftjuice.config import RFTConfig, SftjuiceError, SRPPOConfig

    assert RFTConfig(policy_steps=0).policy_steps == 0
    with pytest.raises(SftjuiceError, match=r"^--policy-steps 0: --method srppo trains only the policy: must be >= 1$"):
        SRPPOConfig(policy_steps=0)


@pytest.mark.parametrize("method", ["sft", "irft", "spin", "rft", "srppo", "rso", "steps", "rest"])
def test_help_lists_each_option_once_with_its_range_and_default(method, capsys, monkeypatch):
    import dataclasses

    from sftjuice.config import METHOD_CONFIGS, _range_text, flag

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped help text
    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--help"])
    entries = re.split(r"\n(?=  -)", capsys.readouterr().out.split("\noptions:\n")[1])  # an option, its help
    cls = METHOD_CONFIGS[method]
    assert len(entries) == 2 + len(dataclasses.fields(cls))  # -h, --config and the options
    for f in dataclasses.fields(cls):
        mine = [entry for entry in entries if re.match(rf"  {re.escape(flag(f.name))}[ ,]", entry)]
        assert len(mine) == 1, (f.name, mine)
        bounds = _range_text(f.metadata)
        assert f"({bounds}; default: " in mine[0] if bounds else "(default: " in mine[0], mine[0]
        assert f"default: {getattr(cls(), f.name)})" in mine[0], mine[0]


def test_a_name_has_one_help_text_in_every_method():
    """An option shared by methods is declared once: its help (what it means) is the same in
    each. The exceptions are options whose choices or role differ by method."""
    import dataclasses

    from sftjuice.config import METHOD_CONFIGS

    helps: dict[str, set] = {}
    for cls in METHOD_CONFIGS.values():
        for f in dataclasses.fields(cls):
            helps.setdefault(f.name, set()).add(f.metadata["help"])
    differing = {name for name, texts in helps.items() if len(texts) > 1}
    # loss: irft/spin's l(u) choices vs rso's DPO/SLiC ones; passes and sft_weight: each says what
    # its method's pairs are; reward_model: rft's starting point vs rso's fixed judge; eval_data,
    # verifier, max_new_tokens: sft's choose the epoch to keep (greedy answers on held-out rows,
    # no verifier = by NLL), where irft's report a margin and the sampling methods' judge samples
    assert differing == {"loss", "passes", "sft_weight", "reward_model", "eval_data", "verifier", "max_new_tokens"}


def test_a_run_started_before_the_renames_resumes(tmp_path):
    """Its manifest names RFT's KL coefficient beta and RSO's coefficients beta and gamma."""
    from sftjuice.config import RFTConfig, RSOConfig, config_dict
    from sftjuice.training import check_output

    for cfg, old_names in [(RFTConfig(resume=True), {"kl_coef": "beta"}),
                           (RSOConfig(resume=True, reward="implicit"), {"beta": "gamma", "rejection_beta": "beta"})]:
        out = tmp_path / cfg.method
        out.mkdir()
        saved = {old_names.get(k, k): v for k, v in config_dict(cfg).items()}
        old = {"method": cfg.method, "config": saved, "data": "d", "model": "m", "precision": "fp32"}
        (out / "manifest.json").write_text(json.dumps(old))
        check_output(out, cfg, {**old, "config": config_dict(cfg)})  # resumes: nothing changed
        changed = {**config_dict(cfg), "kl_coef" if cfg.method == "rft" else "rejection_beta": 7.0}
        with pytest.raises(Exception, match="was started with other settings: --(kl-coef|rejection-beta) .* -> 7.0"):
            check_output(out, cfg, {**old, "config": changed})
