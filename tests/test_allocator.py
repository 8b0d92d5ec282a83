"""gpt/allocator.py: a CPU run keeps freed memory for its next step instead of faulting it in again.

The allocator's settings are process-wide, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO, tiny_args, tiny_config

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

# Allocates and frees 48 MB (above glibc's largest automatic mmap threshold, 32 MB, like the
# peer's [N, V] logits at the default shape) 24 times, writing every page, and reports the page
# faults of the last 12 rounds. Kept, the first rounds still grow the heap (torch asks for
# 64-byte-aligned memory, a little more than a freed block of the same size offers) until
# freed neighbours merge, which took 2-11 rounds here; from then on, none.
REUSE = """
import json, resource, sys, torch
from gpt import allocator
note = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(12 * 2**20)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"note": note, "faults": sum(faults[12:])}))
"""


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any allocator setting of its own (a developer
    comparing allocators may have one set), plus `env`."""
    from gpt import allocator

    drop = {*allocator.USER_SETTINGS, allocator.OPT_OUT, "LD_PRELOAD", "GLIBC_TUNABLES"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **env}


def reuse(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", REUSE, mode], cwd=REPO, capture_output=True, text=True,
                         env=clean_env(**env), check=True).stdout
    return json.loads(out.splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    kept = reuse("keep")
    assert kept["note"] == "glibc malloc keeps freed blocks up to 1 GB for reuse"
    # 12 rounds x 48 MB are ~147,000 faults of 4 KB pages if each round gets fresh memory; at
    # most one round's worth (12,288) is allowed for a heap still settling.
    assert kept["faults"] < 13_000, kept
    system = reuse("system")
    assert system["faults"] > 100_000, system


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_users_own_malloc_settings_are_left_alone(env):
    kept = reuse("keep", **env)
    assert kept["note"] == f"glibc malloc as {next(iter(env))} set it"
    assert kept["faults"] > 10_000, kept  # mmap()ed afresh every round, as the user's settings say


@glibc_only
def test_gpt_cpu_malloc_system_keeps_glibcs_behaviour():
    system = reuse("keep", GPT_CPU_MALLOC="system")
    assert system["note"] == "the system's allocator as it is (GPT_CPU_MALLOC=system)"
    assert system["faults"] > 10_000, system


def test_a_bad_gpt_cpu_malloc_is_a_config_error(monkeypatch):
    from gpt import allocator
    from gpt.config import ConfigError

    monkeypatch.setenv("GPT_CPU_MALLOC", "off")
    with pytest.raises(ConfigError, match="GPT_CPU_MALLOC='off': use 'system'"):
        allocator.keep_freed_memory()


def test_only_the_thresholds_settings_count_as_the_users_own(monkeypatch):
    from gpt import allocator

    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0:glibc.malloc.check=0")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.user_settings() == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.trim_threshold=131072")
    assert allocator.user_settings() == ["GLIBC_TUNABLES"]


def test_a_preloaded_allocator_is_left_as_it_is(monkeypatch):
    from gpt import allocator

    # Returns before mallopt, so this process's allocator is not changed.
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert allocator.keep_freed_memory() == "jemalloc (LD_PRELOAD) as it is"


@glibc_only
def test_train_py_keeps_freed_memory_and_a_library_caller_is_left_alone(char_data, tmp_path):
    out = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, tmp_path / "cli", max_steps=2,
                                                                 eval_interval=2)],
                         cwd=REPO, capture_output=True, text=True, env=clean_env(), check=True).stdout
    assert "cpu memory: glibc malloc keeps freed blocks up to 1 GB for reuse" in out.splitlines()
    # train() called from Python: the setting would outlast the run in the caller's process.
    config = tiny_config(char_data, tmp_path / "library", max_steps=2, eval_interval=2)
    code = ("import sys; from gpt.trainer import train; from gpt.config import TrainConfig; "
            "train(TrainConfig(**__import__('json').loads(sys.argv[1])).validate())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config.to_dict())], cwd=REPO,
                         capture_output=True, text=True, env=clean_env(), check=True).stdout
    assert "cpu memory:" not in out and "parallel: none" in out
