"""The ``gfm`` dispatcher and ``gfm pretrain``'s config handling, as a user meets them.

The dispatcher runs as a real process (the venv's ``gfm`` script when installed, else ``python -m
gfm.cli``); config errors and ``--print-config`` go through ``gfm.cli.main`` in-process, which is the
same code path without a second interpreter start-up per case.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gfm import __version__
from gfm.cli import PROGRAMS
from gfm.cli import main as gfm_main
from gfm.config import load

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pretrain" / "configs" / "cpu_smoke.yaml"
SCRIPT = Path(sys.executable).with_name("gfm")
GFM = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gfm.cli"]


def gfm(*args: str, script: bool = True) -> subprocess.CompletedProcess[str]:
    """``gfm ARGS`` as a process: the installed script, or ``python -m gfm.cli`` on this working tree."""
    cmd = GFM if script else [sys.executable, "-m", "gfm.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_help_lists_every_command() -> None:
    proc = gfm("--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("commands:")[1].splitlines() if line.startswith("  ")]
    assert listed == list(PROGRAMS) and {"shards", "pretrain", "bench", "demo"} <= set(listed)


def test_unknown_command_exits_2_with_a_message() -> None:
    proc = gfm("pretrian")
    assert proc.returncode == 2
    assert proc.stderr.startswith("gfm: unknown command 'pretrian'") and "pretrain" in proc.stderr
    assert proc.stdout == ""


def test_version() -> None:
    proc = gfm("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gfm {__version__}"


@pytest.mark.parametrize("command", list(PROGRAMS))
def test_every_command_has_help(command: str) -> None:
    # on the working tree: an editable install made before a program package was added cannot find it
    proc = gfm(command, "--help", script=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert f"gfm {command}" in proc.stdout and "Traceback" not in proc.stderr


# --- gfm pretrain: config errors and --print-config ---------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["engine.zero=1"], "engine.zero: unknown key (known: compile, compile_dynamic, compile_mode, deepspeed,"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["data.loader.num_workers=two"], "data.loader.num_workers: expected int, got 'two'"),
        (["model.name=less_vit_gigantic"], "model.name: unknown model 'less_vit_gigantic' (known: dense_vit_base,"),
        (["data.source=shards"], "data.loader.shards: empty, but source is 'shards'"),
        (["data.source=shards", "data.loader.shards=/no/such/shards"],
         "data.loader.shards: '/no/such/shards' does not exist"),
    ],
)
def test_pretrain_config_error_is_one_line_and_exit_2(
    overrides: list[str], line: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc = gfm_main(["pretrain", "--config", str(SMOKE), f"run_dir={tmp_path / 'run'}", *overrides])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"gfm pretrain: config error: {line}"), err
    assert not (tmp_path / "run").exists()  # nothing started


def test_print_config_shows_every_default_and_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gfm.data import LoaderConfig
    from gfm.train.config import TrainConfig

    overrides = ["steps=17", "data.loader.crop_size=16"]
    assert gfm_main(["pretrain", "--config", str(SMOKE), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    tree = yaml.safe_load(printed)
    assert list(tree["data"]["loader"]) == list(LoaderConfig.__dataclass_fields__)
    assert tree["data"]["loader"]["crop_size"] == 16 and tree["data"]["loader"]["replay_on_resume"] is False
    assert set(tree) == set(TrainConfig.__dataclass_fields__)
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert load(TrainConfig, path) == load(TrainConfig, SMOKE, overrides)
