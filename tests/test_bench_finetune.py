"""``gfm bench finetune`` runs both methods through the fine-tuning engine and ends with its RESULT line."""

from __future__ import annotations

import re

import pytest

from bench import finetune


@pytest.mark.slow
def test_bench_finetune_prints_both_methods_and_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "less_vit_tiny", "--depth", "1", "--batch-size", "1", "--tile", "16", "--channels", "4",
            "--steps", "1", "--rounds", "1", "--rank", "2"]
    assert finetune.main(argv) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^(full|lora)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)", out, re.M)}
    assert rows.keys() == {"full", "lora"}
    assert float(rows["full"].group(4)) == 100.0 and float(rows["lora"].group(4)) < 5.0
    result = re.search(r"^RESULT lora_mem_ratio=(\d+\.\d+) lora_time_ratio=(\d+\.\d+)$", out, re.M)
    assert result is not None and float(result.group(1)) > 0 and float(result.group(2)) > 0
