"""A full disk in the middle of a real training run: a small tmpfs as --output, with room
for one checkpoint of the tiny model but not two. The run must end with one line naming
the path and "No space left on device" (no traceback), and leave the last complete
checkpoint intact and loadable, with no half-written final checkpoint directory.

Needs root (to mount a tmpfs); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .conftest import run_cli


def mount_tmpfs(path: Path, size: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def checkpoint_sizes(model_dir: Path) -> tuple[int, int]:
    """(model.safetensors, optimizer.bin) of one checkpoint of full SFT: the fp32 weights,
    and AdamW's two fp32 moments per weight."""
    weights = (model_dir / "model.safetensors").stat().st_size
    return weights, 2 * weights


# Where the second checkpoint runs out of room: in its model.safetensors (safetensors
# reports "No space left on device (os error 28)") or, after the weights fit, in its
# optimizer.bin (torch.save reports only "unexpected pos" / "file write failed").
@pytest.mark.parametrize("fails_in", ["model.safetensors", "optimizer.bin"])
def test_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(fails_in, tiny_model_dir, demo_file, tmp_path):
    weights, optimizer = checkpoint_sizes(tiny_model_dir)
    one_checkpoint = weights + optimizer + (1 << 20)  # + RNG / scheduler states, config.yaml, metrics.jsonl
    room = weights // 2 if fails_in == "model.safetensors" else weights + optimizer // 2
    size = one_checkpoint + room
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size)
    try:
        out = disk / "run"
        proc = run_cli("train", "--method", "sft", "--model", tiny_model_dir, "--data", demo_file, "--output", out,
                       "--per-device-batch-size", "4", "--save-every", "1", "--keep-checkpoints", "2",
                       "--learning-rate", "1e-3", check=False)
        stderr = proc.stderr
        assert proc.returncode != 0, f"the run did not fail on a {size}-byte disk:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-5000:]
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert last.startswith("sftjuice train: error: ") and len(last) < 300, last
        assert str(out) in last and last.endswith("No space left on device"), last
        assert fails_in in last, last

        # the last complete checkpoint is intact; nothing half-written under a final name
        checkpoints = out / "checkpoints"
        finished = sorted(p for p in checkpoints.iterdir() if not p.name.startswith("."))
        leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
        assert [p.name for p in finished] == ["step-0000001"], (finished, leftovers)
        assert all(name.endswith(".tmp") for name in leftovers), leftovers
        ckpt = finished[0]
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
        state = torch.load(ckpt / "optimizer.bin", weights_only=True)
        assert state["state"], "optimizer state is empty"
        assert not (out / "final").exists()
        for line in (out / "metrics.jsonl").read_text().splitlines():  # every line whole
            json.loads(line)
    finally:
        unmount(disk)


def test_read_only_output_is_one_line(tiny_model_dir, demo_file, tmp_path):
    disk = tmp_path / "ro"
    mount_tmpfs(disk, 1 << 20)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        out = disk / "run"
        proc = run_cli("train", "--method", "sft", "--model", tiny_model_dir, "--data", demo_file, "--output", out,
                       check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-5000:]
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
        assert last == f"sftjuice train: error: {out}: Read-only file system", last
    finally:
        unmount(disk)


def test_atomic_writes_on_a_full_disk_keep_the_previous_version(tmp_path):
    """storage's writers on a full disk: OSError naming the final path, the previous
    version untouched, no temporary file left; a metrics line is never left half-written."""
    from safetensors.torch import save_file

    from sftjuice.storage import MetricsLog, atomic_dir, atomic_write_text, os_error_message, write_jsonl

    disk = tmp_path / "disk"
    mount_tmpfs(disk, 2 << 20)
    try:
        metrics = MetricsLog(disk / "metrics.jsonl")
        metrics.write({"step": 1})
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        with pytest.raises(OSError) as e:
            for step in range(2, 100):
                metrics.write({"step": step, "pad": "x" * 1000})
        assert os_error_message(e.value) == f"{disk / 'metrics.jsonl'}: No space left on device"
        text = (disk / "metrics.jsonl").read_text()  # whole lines only (the last page had room for a few)
        steps = [json.loads(line)["step"] for line in text.splitlines()]
        assert text.endswith("\n") and steps == list(range(1, len(steps) + 1)) and len(steps) < 98
        (disk / "filler").unlink()
        (disk / "metrics.jsonl").unlink()

        target = disk / "rows.jsonl"
        write_jsonl(target, [{"a": 1}])
        with pytest.raises(OSError) as e:
            atomic_write_text(target, "x" * (3 << 20))
        assert os_error_message(e.value) == f"{target}: No space left on device"
        assert target.read_text() == '{"a": 1}\n'

        model = disk / "model"
        with atomic_dir(model) as tmp:
            (tmp / "config.json").write_text("{}")
        big = {"w": torch.zeros(1 << 20)}  # 4 MiB
        writers = {"model.safetensors": lambda path: save_file(big, str(path)),
                   "optimizer.bin": lambda path: torch.save(big, path)}
        for name, write in writers.items():
            with pytest.raises(OSError) as e:
                with atomic_dir(model) as tmp:
                    write(tmp / name)
            assert os_error_message(e.value) == f"{model / name}: No space left on device"
            assert sorted(p.name for p in disk.iterdir()) == ["model", "rows.jsonl"]
            assert sorted(p.name for p in model.iterdir()) == ["config.json"]
            del e  # its traceback holds torch's writer, and so the removed file's space
    finally:
        unmount(disk)
