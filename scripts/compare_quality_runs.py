"""Are two runs of `benchmarks/quality.py --quick` the same? Stage by stage: the eval
results (every prompt), the round files byte for byte, every step's loss, grad_norm and lr,
and every round record (seconds and times left out). Used to show a refactor changed no
behaviour: run the quick benchmark on the commit before and after, each with its own
--work, then

    python scripts/compare_quality_runs.py WORK_BEFORE WORK_AFTER

Prints a line per stage and "identical" or "NOT identical" (exit status 1)."""
import json, sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])
root_a = a / "quick/numbers__round_number/clean/seed0"
root_b = b / "quick/numbers__round_number/clean/seed0"
SKIP = ("seconds", "time")
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if not any(s in k for s in SKIP)}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
ok = True
for stage in sorted(p.name for p in root_a.iterdir() if p.is_dir() and p.name != "data"):
    sa, sb = root_a / stage, root_b / stage
    if not (sb / "eval.json").exists() or not (sa / "eval.json").exists():
        print(f"{stage}: not in both yet"); continue
    ev = clean(json.loads((sa / "eval.json").read_text())) == clean(json.loads((sb / "eval.json").read_text()))
    rf = sorted(p.relative_to(sa) for p in sa.glob("rounds/**/*.jsonl"))
    rounds_same = rf == sorted(p.relative_to(sb) for p in sb.glob("rounds/**/*.jsonl")) and all(
        (sa / f).read_bytes() == (sb / f).read_bytes() for f in rf)
    def steps(d):
        ms = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
        return [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("lr")) for m in ms if "event" not in m]
    st = steps(sa) == steps(sb)
    rounds_ev = lambda d: [clean(m) for m in (json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()) if m.get("event")] if (d / "metrics.jsonl").exists() else []
    ev_rounds = rounds_ev(sa) == rounds_ev(sb)
    n = len(steps(sa))
    print(f"{stage}: eval {'same' if ev else 'DIFFERENT'}; {len(rf)} round files {'byte-identical' if rounds_same else 'DIFFERENT'}; "
          f"{n} steps' loss/grad_norm/lr {'identical' if st else 'DIFFERENT'}; round/event records {'identical' if ev_rounds else 'DIFFERENT'}")
    ok &= ev and rounds_same and st
print("identical" if ok else "NOT identical")
sys.exit(0 if ok else 1)
