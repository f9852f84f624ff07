"""`import surgical` and the command line's start stay light: the HF Trainer stack (and with it
peft and bitsandbytes, seconds of imports) loads only when a Trainer helper or the training loop is
first used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("peft", "bitsandbytes", "transformers.trainer", "transformers.trainer_utils", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    script = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return [m for m in p.stdout.strip().split(",") if m]


def test_import_surgical_and_the_cli_load_no_trainer_stack():
    assert _loaded_after("import surgical") == []
    assert _loaded_after("import surgical.cli") == []


def test_the_trainer_helpers_still_resolve_on_first_use():
    loaded = _loaded_after(
        "import surgical as sg\n"
        "from transformers import TrainerCallback\n"
        "assert issubclass(sg.SurgicalCallback, TrainerCallback)\n"
        "from surgical.train import SurgicalCallback\n"
        "assert SurgicalCallback is sg.SurgicalCallback and 'SurgicalCallback' in sg.__all__"
    )
    assert "transformers.trainer_utils" in loaded  # now, and only now
