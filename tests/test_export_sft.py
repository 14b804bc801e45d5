"""scripts/export_sft.sh: the Hugging Face model of a verl SFT run's last (or a chosen) step, with
the base checkpoint's processor files, as ``make learn``'s cached warm starts use it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "export_sft.sh"), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_exports_the_last_or_the_chosen_step_with_the_processor_files(tmp_path):
    run, base = tmp_path / "run", tmp_path / "base"
    for step in (100, 200, 1000):  # sorted as numbers: 1000 is the last
        hf = run / f"global_step_{step}" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "model.safetensors").write_text(f"weights of step {step}")
    base.mkdir()
    (base / "preprocessor_config.json").write_text('{"max_pixels": 50176}')
    (base / "chat_template.jinja").write_text("template")

    last = _run(run, base, tmp_path / "last")
    assert last.returncode == 0, last.stderr
    assert (tmp_path / "last" / "model.safetensors").read_text() == "weights of step 1000"
    assert (tmp_path / "last" / "preprocessor_config.json").read_text() == '{"max_pixels": 50176}'
    chosen = _run(run, base, tmp_path / "s200", 200)
    assert chosen.returncode == 0, chosen.stderr
    assert (tmp_path / "s200" / "model.safetensors").read_text() == "weights of step 200"
    assert (tmp_path / "s200" / "chat_template.jinja").exists() and not (tmp_path / "s200.tmp").exists()

    missing = _run(run, base, tmp_path / "s300", 300)
    assert missing.returncode == 1 and "global_step_300" in missing.stderr and not (tmp_path / "s300").exists()
