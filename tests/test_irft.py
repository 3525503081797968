"""IRFT / SPIN: sampler log-probs, the loss and its gradient, a round's effect, SPIN = IRFT (kill and resume: test_resume.py)."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from sftjuice.config import IRFTConfig, ModelConfig, SamplingConfig
from sftjuice.data import ChatFormat, collate
from sftjuice.generation import sample
from sftjuice.losses import irl_pair_loss, margin_loss
from sftjuice.models import load_policy, load_tokenizer
from sftjuice.storage import read_jsonl
from sftjuice.scoring import completion_logprobs, sequence_logprobs_of, singletons, token_logprobs_of

from .conftest import assert_same_weights, build_tiny_model, per_token_nll, read_metrics, run_cli, sort_rows, write_jsonl


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sampler_logprobs_equal_a_fresh_forward_pass(tokenizer, temperature, top_p):
    model = build_tiny_model(tokenizer, seed=1).eval()
    chat = ChatFormat(tokenizer, [tokenizer.eos_token_id])
    prompts = [chat.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in sort_rows(5)]
    cfg = SamplingConfig(num_samples=2, temperature=temperature, top_p=top_p, max_new_tokens=12, generation_batch_size=4)
    samples = sample(model, prompts, cfg, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=0, progress=False)
    assert [len(s) for s in samples] == [2] * 5
    with torch.no_grad():
        for p, ss in zip(prompts, samples):
            for s in ss:  # unpadded, no cache, full log-softmax
                ids = torch.tensor([p + s.token_ids])
                logp = model(ids).logits[0].log_softmax(-1)
                fresh = [logp[len(p) + t - 1, tok].item() for t, tok in enumerate(s.token_ids)]
                torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(fresh), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 0.8)])
def test_token_picker_draws_from_the_tempered_top_p_distribution(temperature, top_p):
    """20,000 draws per row against the distribution the settings define; tokens outside
    the top-p set are never drawn."""
    from sftjuice.generation import _pick

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0], [0.0, 0.0, 3.0, 0.5, 1.0]])
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:  # keep the most likely tokens until they cover top_p
        sorted_p, order = probs.sort(-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, sorted_p.cumsum(-1) - sorted_p < top_p)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([_pick(logits, temperature, top_p, torch.rand((2, 1), generator=generator, dtype=torch.float64))
                         for _ in range(20_000)])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        sigma = (probs[row].double() * (1 - probs[row].double()) / len(draws)).sqrt()
        assert ((freq - probs[row].double()).abs() <= 4 * sigma + 1e-12).all(), (freq, probs[row])
        assert (freq[probs[row] == 0] == 0).all()


def test_sampling_is_reproducible_and_stops_at_eos(tokenizer):
    model = build_tiny_model(tokenizer, seed=1).eval()
    with torch.no_grad():  # make the end-of-turn token likely so some rows stop early
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        model.model.embed_tokens.weight[tokenizer.eos_token_id] += 0.5 * model.model.norm.weight
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    cfg = SamplingConfig(num_samples=3, max_new_tokens=20)
    a = sample(model, prompts, cfg, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=5, progress=False)
    b = sample(model, prompts, cfg, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=5, progress=False)
    assert [[s.token_ids for s in ss] for ss in a] == [[s.token_ids for s in ss] for ss in b]
    for s in (s for ss in a for s in ss):
        assert s.finished == (s.token_ids[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in s.token_ids[:-1]
        assert s.finished or len(s.token_ids) == 20


def test_a_sample_does_not_depend_on_the_prompts_it_shares_a_batch_with(tokenizer):
    """Per-prompt seeds: prompt i drawn alone, or in a batch of other prompts that stop at
    other times (rows leave the cache), gives the same tokens and log-probs."""
    model = build_tiny_model(tokenizer, seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 0
        model.model.embed_tokens.weight[tokenizer.eos_token_id] += 0.5 * model.model.norm.weight
    prompts, seeds = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [11, 22, 33]
    cfg = SamplingConfig(num_samples=2, max_new_tokens=16)
    together = sample(model, prompts, cfg, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=seeds, progress=False)
    lengths = {len(s.token_ids) for ss in together for s in ss}
    assert len(lengths) > 1  # rows did stop at different steps
    for i, p in enumerate(prompts):
        alone = sample(model, [p], cfg, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=[seeds[i]], progress=False)[0]
        assert [s.token_ids for s in alone] == [s.token_ids for s in together[i]]
        for a, b in zip(alone, together[i]):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize(
    "kind, u, expected_loss, expected_dloss_du",
    [
        ("logistic", 0.0, 0.6931471805599453, -0.5),
        ("logistic", 2.0, 0.12692801104297263, -0.11920292202211755),
        ("linear", 0.7, -0.7, -1.0),
        ("hinge", 0.25, 0.75, -1.0),
        ("hinge", 1.5, 0.0, 0.0),
    ],
)
def test_pair_loss_and_gradient_against_hand_values(kind, u, expected_loss, expected_dloss_du):
    beta = 0.5
    # choose log-probs whose margin is u: beta*(pc - rc) - beta*(pr - rr) = u
    pc = torch.tensor([u / beta - 1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    loss, r_c, r_r = irl_pair_loss(pc, rc, pr, rr, beta, kind)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert (r_c - r_r).item() == pytest.approx(u)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(beta * expected_dloss_du)
    assert pr.grad.item() == pytest.approx(-beta * expected_dloss_du)
    if kind != "hinge":  # (hinge has a kink at u = 1)
        inputs = (pc.detach().requires_grad_(), pr.detach().requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: irl_pair_loss(a, rc, b, rr, beta, kind)[0], inputs)


def test_irft_gradient_on_a_model_follows_the_formula(tokenizer):
    """grad L = beta * l'(u) * (grad log pi(y^E) - grad log pi(y_hat)), through a real model."""
    model = build_tiny_model(tokenizer, seed=2)
    prompt, demo, own = [1, 9690, 198, 2683], [216, 34, 28, 2], [520, 9531, 198, 17, 2]
    ref_c, ref_r, beta = -40.0, -38.0, 0.3
    batch = collate([prompt, prompt], [demo, own], tokenizer.pad_token_id)
    lp = completion_logprobs(model, batch).sum(-1)
    loss, rc, rr = irl_pair_loss(lp[:1], torch.tensor([ref_c]), lp[1:], torch.tensor([ref_r]), beta, "logistic")
    grads = torch.autograd.grad(loss.sum(), list(model.parameters()), retain_graph=True)
    u = (rc - rr).item()
    g_c = torch.autograd.grad(lp[0], list(model.parameters()), retain_graph=True)
    g_r = torch.autograd.grad(lp[1], list(model.parameters()))
    dl_du = -torch.sigmoid(torch.tensor(-u)).item()
    for g, a, b in zip(grads, g_c, g_r):
        torch.testing.assert_close(g, beta * dl_du * (a - b), rtol=1e-4, atol=1e-7)
    assert margin_loss(torch.tensor(u), "logistic").item() == pytest.approx(F.softplus(torch.tensor(-u)).item())


IRFT = ["--epochs", "1", "--learning-rate", "1e-3", "--seed", "4", "--max-new-tokens", "10",
        "--per-device-batch-size", "4", "--lr-scheduler", "constant"]


def test_a_linear_loss_round_raises_demonstrations_and_lowers_samples(wrong_task_model_dir, demo_file, tmp_path):
    out = tmp_path / "o"
    heldout = write_jsonl(tmp_path / "heldout.jsonl", sort_rows(40)[24:])
    run_cli("train", "--method", "irft", "--model", wrong_task_model_dir, "--data", demo_file, "--output", out,
            *IRFT, "--rounds", "1", "--passes", "2", "--loss", "linear", "--num-samples", "2", "--learning-rate", "3e-4",
            "--eval-data", heldout, "--eval-size", "12")
    rows = [json.loads(line) for line in (out / "rounds/0/generations.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["samples"]) == 2 for r in rows)
    tok = load_tokenizer(out / "final")
    chat = ChatFormat(tok, [tok.eos_token_id])
    prompts = [chat.prompt_ids(r["prompt"]) for r in rows]
    after = load_policy(ModelConfig(), out / "final", trainable=False)
    demo_after = [x[0] for x in sequence_logprobs_of(after, tok.pad_token_id, prompts, singletons(
        [chat.completion_ids(r["prompt"], r["demonstration"]) for r in rows]))]
    sample_after = [x[0] for x in sequence_logprobs_of(after, tok.pad_token_id, prompts, singletons(
        [r["samples"][0]["token_ids"] for r in rows]))]
    demo_before = [r["demonstration_logprob"] for r in rows]
    sample_before = [sum(r["samples"][0]["token_logprobs"]) for r in rows]
    assert sum(demo_after) / 24 > sum(demo_before) / 24 + 10.0
    assert sum(sample_after) / 24 < sum(sample_before) / 24 - 1.0
    steps = [m for m in read_metrics(out) if "event" not in m]
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-3)  # pi_theta = pi_t at the start of the round
    assert steps[-1]["margin"] > 0.5 and steps[-1]["margin_positive"] > 0.9
    [round_record] = [m for m in read_metrics(out) if m.get("event") == "round"]
    assert round_record["pairs"] == 48 and 0 < round_record["sample_length_mean"] <= 10
    assert round_record["sample_cut_fraction"] < 0.5  # the model answers and stops
    # on 12 held-out prompts never trained on, the learned implicit reward also separates
    assert len((out / "rounds/0/heldout.jsonl").read_text().splitlines()) == 12
    assert round_record["heldout_margin"] > 0.5 and round_record["heldout_margin_positive"] > 0.9


@pytest.mark.slow
def test_spin_equals_irft_with_matching_settings(tiny_model_dir, demo_file, tmp_path):
    # without --epochs; the NLL term and the previous round's samples set for both (SPIN's defaults keep them)
    common = ["--model", tiny_model_dir, "--data", demo_file, *IRFT[2:], "--passes", "1", "--sft-weight", "0.5",
              "--keep-previous-round", "false"]
    run_cli("train", "--method", "spin", "--iterations", "2", *common, "--output", tmp_path / "spin")
    run_cli("train", "--method", "irft", *common, "--rounds", "1", "--epochs", "2", "--output", tmp_path / "irft")
    assert_same_weights(tmp_path / "spin/final", tmp_path / "irft/final")
    assert len(list((tmp_path / "spin/rounds").iterdir())) == 2


def test_keep_previous_round_rescores_older_samples_with_the_rounds_starting_policy(tiny_model_dir, demo_file, tmp_path):
    """Round r also trains on round r-1's samples, with reference log-probs of pi_r (the
    policy at round r's start): they equal a fresh forward pass of that checkpoint's weights."""
    from sftjuice.evaluation import load_checkpoint_policy
    from sftjuice.models import resolve_model

    out = tmp_path / "o"
    run_cli("train", "--method", "irft", "--model", tiny_model_dir, "--data", demo_file, "--output", out, *IRFT,
            "--rounds", "3", "--keep-previous-round", "--keep-checkpoints", "10")
    rounds = [m for m in read_metrics(out) if m.get("event") == "round"]
    assert [r["pairs"] for r in rounds] == [8, 16, 16]
    start_of_round_2 = out / "checkpoints" / f"step-{rounds[1]['step']:07d}"
    model, chat = load_checkpoint_policy(start_of_round_2, resolve_model(str(tiny_model_dir)), ModelConfig(), ModelConfig())
    previous = read_jsonl(out / "rounds/2/previous.jsonl")
    assert [r["samples"] for r in previous] != [r["samples"] for r in read_jsonl(out / "rounds/1/generations.jsonl")]
    for row in previous:
        prompt = chat.prompt_ids(row["prompt"])
        [[demo, *samples]] = token_logprobs_of(model, chat.tokenizer.pad_token_id, [prompt], [[
            chat.completion_ids(row["prompt"], row["demonstration"])] + [s["token_ids"] for s in row["samples"]]])
        assert row["demonstration_logprob"] == pytest.approx(sum(demo), abs=1e-4)
        for s, fresh in zip(row["samples"], samples):
            torch.testing.assert_close(torch.tensor(s["token_logprobs"]), torch.tensor(fresh), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_sample_and_train_as_one_does(tiny_model_dir, demo_file, tmp_path):
    """Each process samples and trains on its own share (sampling seeds are named per prompt,
    not per process), the shares are gathered and the pairs split by rank under DDP: the same
    round files, the same losses and the same final weights as one process with the same
    global batch."""
    from pathlib import Path

    from safetensors.torch import load_file

    common = ["train", "--method", "irft", "--model", tiny_model_dir, "--data", demo_file, *IRFT, "--rounds", "2",
              "--per-device-batch-size", "2"]
    run_cli(*common, "--output", tmp_path / "one", "--gradient-accumulation-steps", "2")
    accelerate = Path(sys.executable).parent / "accelerate"
    run_cli(*common, "--output", tmp_path / "two",
            launcher=[str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftjuice.cli"])
    for r in range(2):
        one, two = (read_jsonl(tmp_path / run / f"rounds/{r}/generations.jsonl") for run in ("one", "two"))
        assert [row["samples"][0]["token_ids"] for row in one] == [row["samples"][0]["token_ids"] for row in two]
        for a, b in zip(one, two):
            assert a["demonstration_logprob"] == pytest.approx(b["demonstration_logprob"], abs=1e-4)
    one = [m for m in read_metrics(tmp_path / "one") if "event" not in m]
    two = [m for m in read_metrics(tmp_path / "two") if "event" not in m]
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3) and b["grad_norm"] > 0
    w1, w2 = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(w1[k], start[k]) for k in w1)  # it trained
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)


def test_sft_weight_adds_the_demonstrations_per_token_nll(tiny_model_dir, demo_file, tmp_path):
    from sftjuice.algorithms.irft import pair_micro_loss
    from sftjuice.algorithms.rounds import Completion, Group
    from sftjuice.training import start_run

    losses = {}
    for w in (0.0, 0.5):
        cfg = IRFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / str(w)), sft_weight=w)
        run = start_run(cfg)
        learner = run.learner(run.policy_model, cfg.learning_rate, 1)
        groups = [Group(e, [Completion([216, 34, 2], [-20.0])], demonstration_logprob=-30.0) for e in run.examples[:3]]
        losses[w] = pair_micro_loss(learner, cfg)(groups)[0].item()
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * per_token_nll(run.policy, run.examples[:3]), rel=1e-4)


def test_a_sample_equal_to_its_demonstration_is_left_out_of_the_loss_and_its_count(tiny_model_dir, demo_file, tmp_path):
    """Such a pair has no gradient: kept, it would only dilute the step by counting in the normaliser."""
    from sftjuice.algorithms.irft import pair_micro_loss
    from sftjuice.algorithms.rounds import Completion, Group, distinct_pairs_in
    from sftjuice.training import start_run

    cfg = IRFTConfig(model=str(tiny_model_dir), data=str(demo_file), output=str(tmp_path / "o"), sft_weight=0.5)
    run = start_run(cfg)
    learner = run.learner(run.policy_model, cfg.learning_rate, 1)
    e = run.examples[0]
    other = Completion([216, 34, 2], [-20.0])
    same = Completion(list(e.completion_ids), [-1.0] * len(e.completion_ids))
    both = [Group(e, [same, other], demonstration_logprob=-30.0)]
    alone = [Group(e, [other, other], demonstration_logprob=-30.0)]
    assert distinct_pairs_in(both) == 1 and distinct_pairs_in(alone) == 2
    loss_both, stats_both = pair_micro_loss(learner, cfg)(both)
    loss_alone, _ = pair_micro_loss(learner, cfg)(alone)
    assert loss_both.item() == pytest.approx(loss_alone.item() / 2, rel=1e-5)  # the one distinct pair's loss
    assert stats_both["margin_positive"].item() <= 1
    # a global batch of identical pairs only: no optimiser step, the weights stay, and torch's
    # warning that the schedule stepped before the optimiser (expected here) is not shown
    before = {k: v.clone() for k, v in learner.unwrapped.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = learner.step([Group(e, [same], demonstration_logprob=-30.0)], pair_micro_loss(learner, cfg), distinct_pairs_in)
    assert stats["skipped"] == 1 and not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert all(torch.equal(before[k], v) for k, v in learner.unwrapped.state_dict().items())
