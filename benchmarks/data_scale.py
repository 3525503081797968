"""Scale of data: how a JSONL of short demonstrations at 100k and 1M rows validates,
reports a bad row near its end, tokenises and starts training.

Every measurement runs in its own process, so its peak RSS (``wait4``'s ru_maxrss) is its
own. Rows are short sorting demonstrations like the shipped ones (~45 prompt characters).

  validate   sftjuice.data.load_demonstrations over the whole file: rows/s, peak RSS
  bad row    the real command line on a copy whose line N-1 has an empty completion: the
             time to its one-line error (it names the line; no training starts), and the
             same load with --skip-invalid (the row is counted and skipped)
  tokenise   ChatFormat.encode over the first TOKENISE_ROWS rows: rows/s, and where the
             time goes (the three chat-template renderings and two tokeniser calls a row)
  train      the real command line, SFT of one optimiser step on the whole file
             (--epochs small enough for one step): time to the first step and peak RSS,
             at the sizes given with --train-rows (1M takes minutes of tokenising)

    python benchmarks/data_scale.py [--rows 100000 1000000] [--train-rows 100000 1000000]

Prints a table; writes benchmarks/results/data_scale.md and data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
TOKENISE_ROWS = 20_000
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SFTJUICE_BF16": "false",
       "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_rows(path: Path, n: int, bad_line: int | None = None) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for line in range(1, n + 1):
            xs = [rng.randint(-99, 99) for _ in range(rng.randint(3, 5))]
            row = {"prompt": f"Sort {', '.join(map(str, xs))} in ascending order.",
                   "completion": ", ".join(map(str, sorted(xs)))}
            if line == bad_line:
                row["completion"] = ""
            f.write(json.dumps(row) + "\n")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def peak_rss_mib(cmd: list[str]) -> dict:
    """As :func:`measured`, with the child's own peak RSS from wait4."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"seconds": round(time.time() - t0, 2), "code": os.waitstatus_to_exitcode(status), "stdout": out,
            "stderr": err, "rss_mib": round(usage.ru_maxrss / 1024)}


VALIDATE = """
import sys, time
t0 = time.time()
from sftjuice.data import load_demonstrations
t1 = time.time()
rows = load_demonstrations(sys.argv[1], skip_invalid=sys.argv[2] == "skip")
print(len(rows), round(time.time() - t1, 3))
"""

TOKENISE = """
import cProfile, pstats, io, sys, time
from transformers import AutoTokenizer
from sftjuice.data import ChatFormat, load_demonstrations
from sftjuice.models import resolve_model
demos = load_demonstrations(sys.argv[1])[: int(sys.argv[2])]
chat = ChatFormat(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")))
prof = cProfile.Profile()
t0 = time.time()
prof.enable()
chat.encode(demos, 512, 1024)
prof.disable()
total = time.time() - t0
stats = pstats.Stats(prof).stats
def cum(file, name):
    return sum(v[3] for k, v in stats.items() if k[0].endswith(file) and name in k[2])
print(total, cum("chat_template_utils.py", "render_jinja_template"), cum("tokenization_utils_base.py", "__call__"),
      cum("~", "encode_batch"))
"""


def model_dir() -> str:
    """The tiny test model (a random 2-layer Llama with the real tokenizer): training it
    measures the data path, not the model."""
    path = Path(tempfile.gettempdir()) / "sftjuice-data-scale-model"
    if not (path / "config.json").exists():
        code = ("import sys; sys.path.insert(0, %r)\n" % str(ROOT)
                + "from tests.conftest import build_tiny_model\nfrom transformers import AutoTokenizer\n"
                + "from sftjuice.models import resolve_model\n"
                + "tok = AutoTokenizer.from_pretrained(resolve_model('smollm2-135m-instruct'))\n"
                + f"m = build_tiny_model(tok); m.save_pretrained({str(path)!r}); tok.save_pretrained({str(path)!r})\n")
        r = peak_rss_mib(python(code))
        assert r["code"] == 0, r["stderr"][-2000:]
    return str(path)


def bench(n: int, train: bool, work: Path) -> dict:
    good, bad = work / f"good-{n}.jsonl", work / f"bad-{n}.jsonl"
    write_rows(good, n)
    write_rows(bad, n, bad_line=n - 1)
    out = {"rows": n, "file_mib": round(good.stat().st_size / 2**20, 1)}

    v = peak_rss_mib(python(VALIDATE) + [str(good), "strict"])
    assert v["code"] == 0, v["stderr"][-2000:]
    count, seconds = v["stdout"].split()
    out["validate"] = {"seconds": float(seconds), "rows_per_s": round(n / float(seconds)), "rss_mib": v["rss_mib"]}

    cli = [sys.executable, "-m", "sftjuice.cli", "--quiet", "train", "--model", model_dir()]
    b = peak_rss_mib(cli + ["--data", str(bad), "--output", str(work / f"never-{n}")])
    last = [line for line in b["stderr"].splitlines() if line.strip()][-1]
    assert b["code"] == 2 and f":{n - 1}:" in last and not (work / f"never-{n}").exists(), b["stderr"][-2000:]
    out["bad_row"] = {"seconds": b["seconds"], "rss_mib": b["rss_mib"], "line": last}
    s = peak_rss_mib(python(VALIDATE) + [str(bad), "skip"])
    assert s["code"] == 0 and s["stdout"].split()[0] == str(n - 1), s
    out["skip_invalid"] = {"seconds": float(s["stdout"].split()[1]), "kept": n - 1,
                           "line": [x for x in s["stderr"].splitlines() if "skipped" in x][-1:]}

    k = min(n, TOKENISE_ROWS)
    t = peak_rss_mib(python(TOKENISE) + [str(good), str(k)])
    assert t["code"] == 0, t["stderr"][-2000:]
    total, render, call, rust = map(float, t["stdout"].split())
    out["tokenise"] = {"rows": k, "rows_per_s": round(k / total), "projected_seconds": round(n * total / k),
                       "share_template": round(render / total, 2), "share_tokenizer": round(call / total, 2),
                       "share_rust_encode_batch": round(rust / total, 2)}

    if train:
        r = peak_rss_mib(cli + ["--data", str(good), "--output", str(work / f"run-{n}"), "--per-device-batch-size", "8",
                                "--epochs", str(1 / (n / 8)), "--save-every", "0"])
        assert r["code"] == 0, r["stderr"][-2000:]
        steps = [json.loads(x) for x in (work / f"run-{n}/metrics.jsonl").read_text().splitlines()]
        out["train"] = {"seconds": r["seconds"], "rss_mib": r["rss_mib"], "steps": len(steps),
                        "rows_per_s": round(n / r["seconds"])}
    return out


def table(results: list[dict]) -> str:
    lines = ["| rows | file MiB | validate rows/s | validate peak RSS MiB | bad row at N-1: error after s | "
             "tokenise rows/s (template / tokeniser share) | one SFT step on all rows: s, peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        tr = r.get("train")
        tk = r["tokenise"]
        lines.append(f"| {r['rows']:,} | {r['file_mib']} | {r['validate']['rows_per_s']:,} | {r['validate']['rss_mib']} | "
                     f"{r['bad_row']['seconds']} | {tk['rows_per_s']:,} ({tk['share_template']:.0%} / "
                     f"{tk['share_tokenizer']:.0%}) | "
                     + (f"{tr['seconds']} s, {tr['rss_mib']} MiB |" if tr else f"not run (tokenising ~{tk['projected_seconds']} s) |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--train-rows", type=int, nargs="*", default=[100_000])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="sftjuice-data-scale-") as tmp:
        for n in args.rows:
            results.append(bench(n, n in args.train_rows, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    write(results)


NOTES = """
- validate: `load_demonstrations` alone, in its own process (the interpreter and imports are ~200 MiB of the peak).
- bad row: the real `sftjuice train` from its start to its one-line error naming line N-1; no output folder is made.
- tokenise: `ChatFormat.encode` on the first 20,000 rows under cProfile (which slows it); shares of its time in
  the chat-template renderings (three a row) and in the tokeniser calls (two a row, the Rust encode part of them).
- one SFT step: the real `sftjuice train` of one optimiser step over the whole file on the tiny test model, from
  start to exit: reading, validating and tokenising every row, fingerprinting the file, one step, final/.
"""


def write(results: list[dict]) -> None:
    text = table(results)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "data_scale.md").write_text("# Scale of data\n\n" + text + "\n" + NOTES)


if __name__ == "__main__":
    main()
