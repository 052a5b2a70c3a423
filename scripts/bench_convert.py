"""Peak memory and time of `edge-llm convert` against llama.cpp's convert_hf_to_gguf.py, on the
same checkpoint. llama.cpp's converter: `--llama-cpp DIR` (a checkout), else $LLAMA_CPP_DIR, else the
one the pinned llama-cpp-python sdist vendors (tests/llama_cpp_reference.py finds or fetches it).

    python scripts/bench_convert.py                          # SmolLM2-135M rebuilt from the bundled GGUF
    python scripts/bench_convert.py ./Qwen2-0.5B --outtype f16
    python scripts/bench_convert.py --moe                    # a larger random Qwen3-MoE (bf16)
    python scripts/bench_convert.py --families               # every tiny test fixture, one row each

Each converter runs in its own fresh process; peak RSS is that process tree's (getrusage of the
children of a wrapper process). The outputs are compared tensor by tensor. Prints a table, then one
JSON line.
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
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures and the reference harness live with the tests
from smollm2_checkpoint import smollm2_checkpoint  # noqa: E402  (beside this script)

# Runs a command as its only child and reports that child's wall time and peak RSS.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr_tail": r.stderr.strip().splitlines()[-1:] }))
"""

# edge-llm's converter, reporting whether torch / transformers were imported along the way.
_EDGE = """
import json, sys
from edge_llm.convert import convert
convert(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
print(json.dumps({m: m in sys.modules for m in ("torch", "transformers")}), file=sys.stderr)
"""


def measure(cmd: list[str], pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"measuring {cmd[:3]} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def moe_checkpoint(folder: Path) -> Path:
    """A random Qwen3-MoE, bf16: 8 layers, 32 experts of 768 x 1536 (about 0.9 B parameters): for
    memory, a stacked layer of experts (~150 MiB of bf16 per kind) is what a converter may hold."""
    import torch
    import transformers

    from edge_llm.registry import demo_model_path

    torch.manual_seed(0)
    gguf_path = demo_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=1536, intermediate_size=4096, moe_intermediate_size=768,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=96, num_experts=32,
        num_experts_per_tok=4, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(folder / "moe", max_shard_size="1GB")
    tok.save_pretrained(folder / "moe")
    return folder / "moe"


def upstream_command(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str, pre: str = "",
                     patch: str = "") -> tuple[list[str], str]:
    """llama.cpp's converter with its own gguf-py (and the test harness's pre-tokenizer fallback)."""
    from llama_cpp_reference import _RUNNER

    cmd = [sys.executable, "-c", _RUNNER, str(llama_cpp / "convert_hf_to_gguf.py"), pre, patch, str(hf_dir),
           "--outfile", str(out), "--outtype", outtype]
    return cmd, os.pathsep.join([str(llama_cpp / "gguf-py"), str(llama_cpp)])


def compare_outputs(ours: Path, theirs: Path) -> dict:
    from llama_cpp_reference import gguf_differences

    diffs = gguf_differences(theirs, ours)
    from gguf import GGUFReader

    n = len(GGUFReader(theirs).tensors)
    return {"tensors_llama_cpp": n, "identical": n - sum(k.startswith("tensor ") for k in diffs),
            "differences": diffs}


def run_pair(hf_dir: Path, tmp: Path, outtype: str, llama_cpp: Path, pre: str = "", patch: str = "") -> dict:
    edge_out, ref_out = tmp / "edge.gguf", tmp / "llama-cpp.gguf"
    edge = measure([sys.executable, "-c", _EDGE, str(hf_dir), str(edge_out), outtype])
    if edge["rc"] != 0:
        raise SystemExit(f"edge-llm convert failed: {edge['stderr_tail']}")
    edge["imports"] = json.loads(edge.pop("stderr_tail")[0])
    cmd, path = upstream_command(llama_cpp, hf_dir, ref_out, outtype, pre, patch)
    ref = measure(cmd, pythonpath=path)
    if ref["rc"] != 0:
        raise SystemExit(f"llama.cpp's converter failed: {ref['stderr_tail']}")
    ref.pop("stderr_tail")
    result = {"edge_llm": edge, "llama_cpp": ref, "same_output": compare_outputs(edge_out, ref_out),
              "speedup": ref["seconds"] / edge["seconds"], "rss_ratio": edge["peak_rss_mib"] / ref["peak_rss_mib"]}
    edge_out.unlink()
    ref_out.unlink()
    return result


def families(tmp: Path, outtype: str, llama_cpp: Path) -> list[dict]:
    from tiny_models import FAMILIES, build_tokenizers

    from edge_llm.registry import demo_model_path

    tokenizers = build_tokenizers(tmp / "tokenizers", demo_model_path())
    rows = []
    for name, family in FAMILIES.items():
        tiny = family.build(tmp / name, tokenizers)
        row = run_pair(tiny.path, tmp, outtype, llama_cpp, family.pre, family.upstream_patch)
        row["family"] = name
        row["checkpoint_kib"] = sum(p.stat().st_size for p in tiny.path.glob("*.safetensors")) / 1024
        rows.append(row)
        e, r = row["edge_llm"], row["llama_cpp"]
        print(f"{name:<26} {e['seconds']:>6.2f} s {e['peak_rss_mib']:>6.0f} MiB   {r['seconds']:>6.2f} s "
              f"{r['peak_rss_mib']:>6.0f} MiB   {row['same_output']['identical']}/"
              f"{row['same_output']['tensors_llama_cpp']} identical", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", nargs="?", help="checkpoint folder (default: SmolLM2-135M rebuilt, bf16)")
    parser.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                        help="llama.cpp checkout (default: $LLAMA_CPP_DIR, else the vendored one)")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--moe", action="store_true", help="a random 0.9 B-parameter Qwen3-MoE instead")
    parser.add_argument("--families", action="store_true", help="every tiny fixture of the converter tests")
    args = parser.parse_args()
    if args.llama_cpp:
        llama_cpp = Path(args.llama_cpp).expanduser()
    else:
        from llama_cpp_reference import llama_cpp_dir

        llama_cpp = llama_cpp_dir()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        if args.families:
            print(f"{'fixture':<26} {'edge-llm convert':>20}   {'llama.cpp converter':>20}   tensors")
            rows = families(tmp, args.outtype, llama_cpp)
            print(json.dumps({"outtype": args.outtype, "families": rows}))
            return 0
        hf_dir = (Path(args.hf_dir) if args.hf_dir else moe_checkpoint(tmp) if args.moe
                  else smollm2_checkpoint(tmp / "smollm2-hf"))
        result = {"checkpoint": str(hf_dir), "outtype": args.outtype,
                  "checkpoint_mib": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**20,
                  **run_pair(hf_dir, tmp, args.outtype, llama_cpp)}

    edge, ref, same = result["edge_llm"], result["llama_cpp"], result["same_output"]
    print(f"checkpoint: {result['checkpoint']} ({result['checkpoint_mib']:.0f} MiB), outtype {args.outtype}")
    print(f"{'converter':<34} {'seconds':>8} {'peak RSS MiB':>13}")
    for name, row in (("edge-llm convert", edge), ("llama.cpp convert_hf_to_gguf.py", ref)):
        print(f"{name:<34} {row['seconds']:>8.2f} {row['peak_rss_mib']:>13.0f}")
    print(f"edge-llm imported torch: {edge['imports']['torch']}, transformers: {edge['imports']['transformers']}")
    print(f"speedup {result['speedup']:.2f}x, peak RSS {result['rss_ratio']:.2f}x of llama.cpp's; "
          f"identical tensors {same['identical']}/{same['tensors_llama_cpp']}; other differences: "
          f"{sorted(k for k in same['differences'] if not k.startswith('tensor '))}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
