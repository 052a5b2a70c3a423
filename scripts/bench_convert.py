"""Peak memory and time of `edge-llm convert`, against llama.cpp's convert_hf_to_gguf.py when a
llama.cpp checkout is given (otherwise edge-llm alone), on the same checkpoint.

    python scripts/bench_convert.py                          # SmolLM2-135M rebuilt from the bundled GGUF
    python scripts/bench_convert.py ./Qwen2-0.5B --llama-cpp ~/src/llama.cpp --outtype f16

Each converter runs in its own fresh process; peak RSS is that process tree's (getrusage of the
children of a wrapper process). With both converters, the outputs are compared tensor by tensor.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs a command as its only child and reports that child's wall time and peak RSS.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr_tail": r.stderr.strip().splitlines()[-1:] }))
"""

# The imports at the top of llama.cpp's convert_hf_to_gguf.py, nothing else: a lower bound on its
# time and memory when no checkout is at hand to run it.
_LLAMA_CPP_IMPORTS = "import numpy, torch; from transformers import AutoConfig"

# edge-llm's converter, reporting whether torch / transformers were imported along the way.
_EDGE = """
import json, sys
from edge_llm.convert import convert
convert(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
print(json.dumps({m: m in sys.modules for m in ("torch", "transformers")}), file=sys.stderr)
"""


def measure(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"measuring {cmd[:3]} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def smollm2_checkpoint(folder: Path) -> Path:
    """The bundled SmolLM2 GGUF rebuilt as an HF checkpoint (bf16 safetensors, like hub releases)."""
    import torch
    import transformers

    from edge_llm.registry import demo_model_path

    gguf_path = demo_model_path()
    kwargs = dict(gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare_outputs(a: Path, b: Path) -> dict:
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    same = [n for n in ta if n in tb and ta[n].tensor_type == tb[n].tensor_type
            and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    return {"tensors": len(ta), "tensors_llama_cpp": len(tb), "identical": len(same),
            "only_edge_llm": sorted(set(ta) - set(tb))[:5], "only_llama_cpp": sorted(set(tb) - set(ta))[:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", nargs="?", help="checkpoint folder (default: SmolLM2-135M rebuilt, bf16)")
    parser.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                        help="llama.cpp checkout (default: $LLAMA_CPP_DIR)")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        hf_dir = Path(args.hf_dir) if args.hf_dir else smollm2_checkpoint(tmp / "smollm2-hf")
        rows = {}
        edge_out = tmp / "edge.gguf"
        edge = measure([sys.executable, "-c", _EDGE, str(hf_dir), str(edge_out), args.outtype])
        if edge["rc"] != 0:
            raise SystemExit(f"edge-llm convert failed: {edge['stderr_tail']}")
        edge["imports"] = json.loads(edge.pop("stderr_tail")[0])
        rows["edge-llm convert"] = edge
        result = {"checkpoint": str(hf_dir), "outtype": args.outtype,
                  "checkpoint_mib": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**20,
                  "edge_llm": edge}
        if args.llama_cpp:
            script = Path(args.llama_cpp).expanduser() / "convert_hf_to_gguf.py"
            ref_out = tmp / "llama-cpp.gguf"
            ref = measure([sys.executable, str(script), str(hf_dir), "--outfile", str(ref_out),
                           "--outtype", args.outtype])
            if ref["rc"] != 0:
                raise SystemExit(f"llama.cpp's converter failed: {ref['stderr_tail']}")
            ref.pop("stderr_tail")
            rows["llama.cpp convert_hf_to_gguf.py"] = ref
            result["llama_cpp"] = ref
            result["same_output"] = compare_outputs(edge_out, ref_out)
            result["rss_ratio"] = edge["peak_rss_mib"] / ref["peak_rss_mib"]
            result["speedup"] = ref["seconds"] / edge["seconds"]
        else:
            result["llama_cpp"] = None
            try:
                floor = measure([sys.executable, "-c", _LLAMA_CPP_IMPORTS])
            except SystemExit:
                floor = None
            if floor and floor["rc"] == 0:
                floor.pop("stderr_tail")
                rows["llama.cpp converter's imports only"] = floor
                result["llama_cpp_imports_only"] = floor

    print(f"checkpoint: {result['checkpoint']} ({result['checkpoint_mib']:.0f} MiB), outtype {args.outtype}")
    print(f"{'converter':<34} {'seconds':>8} {'peak RSS MiB':>13}")
    for name, row in rows.items():
        print(f"{name:<34} {row['seconds']:>8.2f} {row['peak_rss_mib']:>13.0f}")
    print(f"edge-llm imported torch: {edge['imports']['torch']}, transformers: {edge['imports']['transformers']}")
    if result["llama_cpp"] is None:
        print("llama.cpp's converter: not run (pass --llama-cpp DIR or set LLAMA_CPP_DIR); its first line, "
              "`import torch` + transformers, is measured alone as a lower bound")
    else:
        same = result["same_output"]
        print(f"speedup {result['speedup']:.2f}x, peak RSS {result['rss_ratio']:.2f}x of llama.cpp's; "
              f"identical tensors {same['identical']}/{same['tensors_llama_cpp']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
