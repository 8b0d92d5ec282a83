"""What goes wrong only over many saves: a reader of a run's latest checkpoint (sample.py, gpt.eval,
gpt.export) racing the run's pruning, and what pinning a checkpoint for reading must not leak."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import torch

from gpt import checkpoint as ckpt
from gpt.model import GPT, GPTConfig

from conftest import REPO


def tiny_model() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    return model, optimizer


def save_steps(saver: ckpt.Checkpointer, model: GPT, optimizer, steps) -> None:
    for step in steps:
        saver.save(step, model, optimizer, {"step": step, "model_config": dataclasses.asdict(model.config)})


# A reader in its own process, as sample.py is: resolves the run, says which checkpoint, waits
# while the run saves on, then reads what it resolved.
READER = textwrap.dedent("""
    import sys
    from gpt import checkpoint as ckpt
    from gpt.model import GPT, GPTConfig
    with ckpt.reading(sys.argv[1]) as path:
        print(path.name, flush=True)
        sys.stdin.readline()
        ckpt.verify_checkpoint(path)
        state = ckpt.read_state(path)
        ckpt.load_model_weights(path, GPT(GPTConfig(**state["model_config"])))
    print("read", flush=True)
""")


def test_a_checkpoint_being_read_is_not_pruned_under_its_reader(tmp_path):
    run = tmp_path / "run"
    model, optimizer = tiny_model()
    saver = ckpt.Checkpointer(run, keep_last=1)
    save_steps(saver, model, optimizer, [1])
    reader = subprocess.Popen([sys.executable, "-c", READER, str(run)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert reader.stdout.readline().strip() == "step_0000001"
        save_steps(saver, model, optimizer, [2, 3, 4])  # a run saving every few steps, keep_last=1
        saver.wait()
        out, err = reader.communicate("go\n", timeout=60)
    finally:
        reader.kill()
    assert reader.returncode == 0 and out.strip() == "read", err[-2000:]
    # Kept for its reader, then pruned by the first save after the reader is gone.
    names = [p.name for p in ckpt.complete_checkpoints(run)]
    assert names == ["step_0000001", "step_0000004"]
    save_steps(saver, model, optimizer, [5])
    saver.close()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_0000005"]
    assert not [p for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]


def test_reading_many_times_leaves_no_descriptor_and_never_stops_this_process_pruning(tmp_path):
    """Pins last for their block: a process that reads its own latest between saves (a sample
    before training on, say) neither keeps those folders from being pruned nor piles up
    descriptors; inside a block, its own save passes over the folder being read."""
    run = tmp_path / "run"
    model, optimizer = tiny_model()
    saver = ckpt.Checkpointer(run, keep_last=2)
    fds = len(os.listdir("/proc/self/fd"))
    for step in range(1, 41):
        save_steps(saver, model, optimizer, [step])
        with ckpt.reading(run) as path:
            assert path.name == ckpt.step_dir_name(step)
        with ckpt.reading(run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)) as path:
            assert path.exists()
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_0000039", "step_0000040"]
    with ckpt.reading(run) as held:
        save_steps(saver, model, optimizer, [41, 42])
        assert held.exists()  # kept for this block: three complete checkpoints for now
    save_steps(saver, model, optimizer, [43])
    saver.close()
    assert sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir()) == ["step_0000042", "step_0000043"]


def test_a_latest_left_half_replaced_by_a_kill_is_cleared_by_the_next_save(tmp_path):
    """write_text_atomic writes `.latest.tmpPID` then renames it over `latest`; a kill -9 between
    the two left the file in the run folder for ever (each process has another PID)."""
    run = tmp_path / "run"
    model, optimizer = tiny_model()
    saver = ckpt.Checkpointer(run, keep_last=1)
    save_steps(saver, model, optimizer, [1])
    (run / ".latest.tmp99999").write_text("step_0000001\n")  # as a killed process leaves it
    save_steps(saver, model, optimizer, [2])
    saver.close()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "latest"]
    assert ckpt.latest_checkpoint(run).name == "step_0000002"
