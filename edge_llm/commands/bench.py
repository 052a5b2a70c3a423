"""`edge-llm bench`: what weight quantization and KV-cache quantization save and cost.

For every weight quant (made with llama.cpp's quantizer from the given GGUF, or from an f16 GGUF
converted from an HF checkpoint; `TYPE+imatrix` with an importance matrix, `--imatrix FILE` or one
computed once from the source with the shipped calibration text) and every KV-cache type, in a fresh subprocess per measurement
(so one variant's memory never pollutes another's):

- file size, load time, peak RSS and KV-cache memory for each scenario (`-np` parallel sequences
  sharing a context of `-c` tokens, as llama-server's -np/-c; default: 1 x 512 and 8 x 2048);
- prompt tokens/s (one stream) and generation tokens/s (one stream and all `-np` streams together);
- perplexity on a text (llama-perplexity's method, edge_llm/commands/perplexity.py), its change against the
  highest-precision variant (largest file, highest-precision KV cache), and the KL divergence of
  next-token distributions against it as llama-perplexity --kl-divergence reports it (mean, 99th
  percentile, same top token).

Writes bench.md (a markdown table), bench.json and bench.png (size vs perplexity, speed per
variant) to the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.files import check_output_path, os_errors
from edge_llm.options import CommandParser

DEFAULT_QUANTS = "f16,q8_0,q5_k_m,q4_k_m"
DEFAULT_KV = "f16,q8_0,q4_0"
IMATRIX_SUFFIX = "+imatrix"  # q4_k_m+imatrix: quantized with the importance matrix
RESULT_MARK = "EDGE_LLM_BENCH_RESULT "


@dataclass(frozen=True)
class Scenario:
    n_parallel: int
    n_ctx: int  # the whole context, shared by the parallel sequences (llama.cpp's -c with -np)

    @property
    def label(self) -> str:
        return f"np={self.n_parallel} c={self.n_ctx}"


@dataclass
class ScenarioResult:
    n_parallel: int
    n_ctx: int
    load_s: float
    rss_base_mib: float  # the Python process before loading (interpreter, numpy, llama_cpp)
    peak_rss_mib: float  # whole process, after load and the speed runs
    kv_mib: float  # computed from the model's shape and the cache types
    kv_mib_llama: float | None  # what llama.cpp's log says it allocated
    compute_buffer_mib: float | None
    prompt_tokens_per_s: float
    gen_tokens_per_s: float  # all n_parallel streams together
    prompt_tokens: int
    gen_tokens: int


@dataclass
class VariantResult:
    quant: str
    kv: str
    path: str
    file_mib: float
    scenarios: list[ScenarioResult] = field(default_factory=list)
    ppl: float | None = None
    ppl_error: float | None = None
    ppl_delta: float | None = None  # vs the reference variant
    mean_kld: float | None = None  # vs the reference variant, as llama-perplexity --kl-divergence
    kld_p99: float | None = None
    same_top: float | None = None  # share of positions whose most likely token is the reference's
    reference: bool = False
    error: str | None = None


# -- sizes ----------------------------------------------------------------------------------------


def kv_bytes_per_element(cache_type: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    except KeyError:
        raise InvalidParameterError(f"unknown KV cache type {cache_type!r}", param="kv") from None
    return size / block


def kv_cache_bytes(metadata: dict[str, str], n_cells: int, cache_type_k: str, cache_type_v: str) -> int:
    """K and V for every layer and cell: n_layer * n_cells * n_head_kv * head_dim * bytes/element
    (as llama_kv_cache allocates them; a model with per-layer head counts is not covered)."""
    arch = metadata["general.architecture"]
    n_layer = int(metadata[f"{arch}.block_count"])
    n_head = int(metadata[f"{arch}.attention.head_count"])
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    n_embd = int(metadata[f"{arch}.embedding_length"])
    head_k = int(metadata.get(f"{arch}.attention.key_length", n_embd // n_head))
    head_v = int(metadata.get(f"{arch}.attention.value_length", n_embd // n_head))
    per_cell = n_head_kv * (head_k * kv_bytes_per_element(cache_type_k) + head_v * kv_bytes_per_element(cache_type_v))
    return round(n_layer * n_cells * per_cell)


def quant_rank(path: Path) -> int:
    """Higher = more precise: a bigger file of the same model keeps more bits per weight."""
    return path.stat().st_size


# -- the worker: one variant, one scenario, in its own process ---------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_prompt_speed(engine: Any, tokens: list[int], n_prompt: int) -> tuple[float, int]:
    """Tokens/s of evaluating a fresh n_prompt-token prompt (time to the first sampled token)."""
    from edge_llm.sampling import SamplingParams

    rates = []
    for rep in range(2):  # distinct prompts, so the prefix cache cannot help
        prompt = tokens[(rep + 1) * 2048 % max(len(tokens) - n_prompt, 1):][:n_prompt]
        start = time.perf_counter()
        for _ in engine.stream(prompt, SamplingParams.create(max_tokens=1, temperature=0)):
            pass
        rates.append(len(prompt) / (time.perf_counter() - start))
    return sum(rates) / len(rates), len(prompt)


def measure_generation_speed(engine: Any, tokens: list[int], n_streams: int, n_gen: int) -> float:
    """Generated tokens/s of n_streams streams together, over the time all of them were generating
    (after the last one produced its first token, before the first one finished)."""
    from edge_llm.sampling import SamplingParams

    params = SamplingParams.create(max_tokens=n_gen, temperature=0, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in range(n_streams)]

    def run(i: int) -> None:
        prompt = tokens[100 + 37 * i:][:16]
        for delta in engine.stream(prompt, params):
            stamps[i].extend([time.perf_counter()] * max(len(delta.token_ids), 1))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    produced = sum(sum(1 for t in s if start < t <= end) for s in stamps)
    if end <= start or produced == 0:
        raise EdgeLLMError("generation too short to measure; raise --n-gen")
    return produced / (end - start)


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one variant for one scenario, measure it, and (if asked) compute its perplexity."""
    from edge_llm.commands.perplexity import compute_perplexity, read_text, tokenize_corpus
    from edge_llm.engines.base import load_engine
    from edge_llm.load_options import LoadOptions

    rss_base = _rss_mib()
    options = LoadOptions(n_ctx=spec["n_ctx"], n_parallel=spec["n_parallel"], cache_type_k=spec["kv"],
                          cache_type_v=spec["kv"], n_threads=spec.get("threads"), verbose=True, seed=0)
    start = time.perf_counter()
    engine = load_engine(spec["path"], options=options)
    load_s = time.perf_counter() - start
    try:
        text = read_text(spec.get("corpus"))
        tokens = tokenize_corpus(engine, text)
        n_prompt = min(spec["n_prompt"], engine.n_ctx_seq - 8)
        n_gen = min(spec["n_gen"], engine.n_ctx_seq - 24)
        measure_generation_speed(engine, tokens, 1, 4)  # warm-up: first-call allocations
        pp, n_prompt = measure_prompt_speed(engine, tokens, n_prompt)
        tg = measure_generation_speed(engine, tokens, spec["n_parallel"], n_gen)
        peak = _peak_rss_mib()
        kv = kv_cache_bytes(engine.metadata, engine.n_ctx, spec["kv"], spec["kv"]) / 2**20
        out: dict[str, Any] = {"scenario": asdict(ScenarioResult(
            n_parallel=spec["n_parallel"], n_ctx=engine.n_ctx, load_s=load_s, rss_base_mib=rss_base,
            peak_rss_mib=peak, kv_mib=kv, kv_mib_llama=None, compute_buffer_mib=None,
            prompt_tokens_per_s=pp, gen_tokens_per_s=tg, prompt_tokens=n_prompt, gen_tokens=n_gen))}
        ppl = spec.get("ppl")
        if ppl:
            from edge_llm.commands.kl_divergence import BaseFile

            base = BaseFile.open(ppl["base"]) if ppl.get("base") else None
            result = compute_perplexity(engine, text, n_ctx=ppl["n_ctx"], max_chunks=ppl.get("chunks"),
                                        kld_base=base, save_base=ppl.get("save"),
                                        cache_type_k=spec["kv"], cache_type_v=spec["kv"])
            out["perplexity"] = asdict(result)
    finally:
        engine.close()
    return out


def parse_llama_log(log: str) -> dict[str, float]:
    """The KV cache and compute buffer sizes llama.cpp reports while creating the context."""
    found: dict[str, float] = {}
    kv = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", log)
    if kv:
        found["kv_mib_llama"] = float(kv[0])  # the first context: the engine's, not perplexity's
    compute = re.findall(r"compute buffer size =\s*([\d.]+) MiB", log)
    if compute:
        found["compute_buffer_mib"] = float(compute[0])
    return found


def run_worker(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]  # the folder that holds edge_llm/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "edge_llm.commands.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    result = next((json.loads(line[len(RESULT_MARK):]) for line in proc.stdout.splitlines()
                   if line.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or result is None:
        tail = [line for line in proc.stderr.splitlines() if "error" in line.lower()][-3:] or proc.stderr.splitlines()[-3:]
        raise EdgeLLMError(f"benchmark worker failed ({proc.returncode}): {' | '.join(tail)}")
    if "error" in result:
        raise EdgeLLMError(result["error"])
    result["scenario"].update(parse_llama_log(proc.stderr))
    return result


# -- variants --------------------------------------------------------------------------------------


def source_gguf(model: str, work_dir: Path, config: str | None = None) -> Path:
    """The GGUF to quantize from: the model itself, or an f16 GGUF converted from an HF checkpoint."""
    path = Path(model)
    if path.is_dir():
        from edge_llm.convert import convert

        work_dir.mkdir(parents=True, exist_ok=True)
        target = work_dir / f"{path.name}.f16.gguf"
        if not target.exists():
            print(f"bench: converting {path} to {target}", file=sys.stderr)
            target = Path(convert(path, out=target, outtype="f16"))
        return target
    from edge_llm.registry import load_registry, resolve

    return resolve(model, load_registry(config)).path


def file_type_name(path: Path) -> str | None:
    from edge_llm.info import read_gguf_info

    return (read_gguf_info(path).file_type or "").lower() or None


def check_quants(quants: list[str]) -> None:
    """Known types; those that cannot be made without an importance matrix must say +imatrix."""
    from edge_llm.quantize import NEEDS_IMATRIX, quant_types

    types = quant_types()
    for quant in quants:
        base = quant.removesuffix(IMATRIX_SUFFIX)
        if base not in types:
            raise InvalidParameterError(f"unknown quant type {base!r}; see `edge-llm quantize -h`", param="quants")
        if base in NEEDS_IMATRIX and not quant.endswith(IMATRIX_SUFFIX):
            raise InvalidParameterError(f"{base} cannot be made without an importance matrix: list it as "
                                        f"{base}{IMATRIX_SUFFIX}", param="quants")


def make_variants(src: Path, quants: list[str], work_dir: Path, imatrix: str | None = None) -> dict[str, Path]:
    """One GGUF per quant, through llama.cpp's quantizer; cached in work_dir between runs.
    `TYPE+imatrix` uses `imatrix` (a file), else one computed from `src` once and kept in work_dir."""
    from edge_llm.quantize import quantize_file

    work_dir.mkdir(parents=True, exist_ok=True)
    src_type = file_type_name(src)
    stem = src.name.removesuffix(".gguf")
    paths = {}
    for quant in quants:
        if quant == src_type:
            paths[quant] = src
            continue
        base = quant.removesuffix(IMATRIX_SUFFIX)
        weighted = quant != base
        target = work_dir / f"{stem}.{base}{'.imatrix' if weighted else ''}.gguf"
        if not target.exists():
            matrix = (imatrix or str(source_imatrix(src, work_dir))) if weighted else None
            print(f"bench: quantizing {src.name} -> {target.name}", file=sys.stderr)
            # llama.cpp prints a warning per tensor that falls back to another type (e.g. rows of
            # 576 are not a multiple of the k-quants' 256): keep them in a log, not on the screen.
            with _stderr_to(work_dir / f"{target.name}.log"):
                quantize_file(src, target, base, allow_requantize=True, imatrix=matrix)
        paths[quant] = target
    return paths


def source_imatrix(src: Path, work_dir: Path) -> Path:
    """The importance matrix of the source over the shipped calibration text, computed once."""
    from edge_llm.imatrix import make_imatrix

    target = work_dir / f"{src.name.removesuffix('.gguf')}.imatrix.gguf"
    if not target.exists():
        print(f"bench: computing the importance matrix of {src.name} -> {target.name}", file=sys.stderr)
        make_imatrix(src, target, progress=True)
    return target


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (where C code writes) to a file for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "w") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def run_bench(src: Path, quants: list[str], kv_types: list[str], scenarios: list[Scenario], work_dir: Path, *,
              ppl_ctx: int = 512, ppl_chunks: int | None = 8, corpus: str | None = None, threads: int | None = None,
              n_prompt: int = 256, n_gen: int = 64, imatrix: str | None = None) -> list[VariantResult]:
    paths = make_variants(src, quants, work_dir, imatrix)
    kv_order = sorted(kv_types, key=kv_bytes_per_element, reverse=True)
    # TYPE+imatrix ranks with TYPE (its file is a few metadata bytes longer), listed after it.
    order = sorted(quants, key=lambda q: quant_rank(paths.get(q.removesuffix(IMATRIX_SUFFIX), paths[q])),
                   reverse=True)
    variants = [VariantResult(q, kv, str(paths[q]), paths[q].stat().st_size / 2**20) for q in order for kv in kv_order]
    variants[0].reference = True
    # The reference's log-probabilities (llama-perplexity's base file, ~2 bytes per vocabulary entry
    # and scored token): written by its run, read by the others', removed at the end.
    ref_file = work_dir / f"reference-{src.name.removesuffix('.gguf')}-{order[0]}-{kv_order[0]}-c{ppl_ctx}.kld"
    total = len(variants) * len(scenarios)
    done = 0
    for variant in variants:
        for k, scenario in enumerate(scenarios):
            done += 1
            spec: dict[str, Any] = {"path": variant.path, "kv": variant.kv, "n_parallel": scenario.n_parallel,
                                    "n_ctx": scenario.n_ctx, "threads": threads, "corpus": corpus,
                                    "n_prompt": n_prompt, "n_gen": n_gen}
            if k == 0:
                spec["ppl"] = {"n_ctx": ppl_ctx, "chunks": ppl_chunks,
                               "save" if variant.reference else "base": str(ref_file)}
            print(f"bench: [{done}/{total}] {variant.quant} KV {variant.kv} {scenario.label} ...", end="",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                if variant.error:
                    raise EdgeLLMError(variant.error)
                result = run_worker(spec)
            except (EdgeLLMError, subprocess.TimeoutExpired) as exc:
                variant.error = getattr(exc, "message", str(exc))
                print(f" failed: {variant.error}", file=sys.stderr)
                if variant.reference:
                    ref_file.unlink(missing_ok=True)
                    raise EdgeLLMError(f"the reference variant failed: {variant.error}") from None
                continue
            variant.scenarios.append(ScenarioResult(**result["scenario"]))
            if "perplexity" in result:
                p = result["perplexity"]
                variant.ppl, variant.ppl_error = p["ppl"], p["ppl_error"]
                if p.get("kld"):
                    kld = p["kld"]
                    variant.mean_kld, variant.kld_p99 = kld["mean_kld"], kld["kld_percentiles"].get("99.0")
                    variant.same_top = kld["same_top"]
            print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr)
    ref_file.unlink(missing_ok=True)
    ref = variants[0]
    for variant in variants:
        if variant.reference:
            variant.mean_kld, variant.kld_p99, variant.same_top = 0.0, 0.0, 1.0
        if variant.ppl is not None and ref.ppl is not None:
            variant.ppl_delta = variant.ppl - ref.ppl
    return variants


# -- reports ---------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(variants: list[VariantResult], scenarios: list[Scenario]) -> str:
    head = ["weights", "KV", "file MiB", "load s"]
    head += [f"RSS MiB {s.label}" for s in scenarios] + [f"KV MiB {s.label}" for s in scenarios]
    head += ["prompt t/s"] + [f"gen t/s np={s.n_parallel}" for s in scenarios]
    head += ["PPL", "ΔPPL", "mean KLD", "KLD p99", "same top %"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        by = {(s.n_parallel, s.n_ctx): s for s in v.scenarios}
        got = [by.get((s.n_parallel, s.n_ctx)) for s in scenarios]
        first = next((g for g in got if g is not None), None)
        cells = [v.quant + (" (ref)" if v.reference else ""), v.kv, f"{v.file_mib:.1f}",
                 _fmt(first.load_s if first else None, ".2f")]
        cells += [_fmt(g.peak_rss_mib if g else None, ".0f") for g in got]
        cells += [_fmt(g.kv_mib if g else None, ".1f") for g in got]
        cells += [_fmt(first.prompt_tokens_per_s if first else None, ".0f")]
        cells += [_fmt(g.gen_tokens_per_s if g else None, ".1f") for g in got]
        cells += [_fmt(v.ppl, ".3f"), _fmt(v.ppl_delta, "+.3f"), _fmt(v.mean_kld, ".4f"), _fmt(v.kld_p99, ".3f"),
                  _fmt(v.same_top * 100 if v.same_top is not None else None, ".1f")]
        if v.error:
            cells[-1] += f" (failed: {v.error[:60]})"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_chart(variants: list[VariantResult], scenarios: list[Scenario], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise EdgeLLMError("the chart needs matplotlib: pip install 'edge-llm[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = chart_figure(variants, scenarios, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_figure(variants: list[VariantResult], scenarios: list[Scenario], title: str) -> Any:
    """Perplexity per weight quant (left) and generation speed per variant (right). Every label
    is a level tick label of a categorical axis, so none can land on another: weight quants sit side by
    side in file-size order (the size in the label), not at their sizes, where q4_k_m and q5_k_m
    are 7 MiB apart and their labels overlapped; each KV type is a marker beside its quant."""
    import matplotlib.pyplot as plt

    kv_types = list(dict.fromkeys(v.kv for v in variants))
    sizes: dict[str, float] = {}
    for v in variants:
        sizes.setdefault(v.quant, v.file_mib)
    quants = sorted(sizes, key=sizes.__getitem__)
    markers = "osD^v<>"
    dodge = 0.5 / max(len(kv_types), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for j, kv in enumerate(kv_types):
        pts = sorted((v for v in variants if v.kv == kv and v.ppl is not None), key=lambda v: quants.index(v.quant))
        xs = [quants.index(v.quant) + (j - (len(kv_types) - 1) / 2) * dodge for v in pts]
        left.plot(xs, [v.ppl for v in pts], marker=markers[j % len(markers)], markersize=7, linewidth=1,
                  alpha=0.85, label=f"KV {kv}")
    left.set_xticks(range(len(quants)))
    left.set_xticklabels([f"{q}\n{sizes[q]:.0f} MiB" for q in quants], fontsize=8)
    left.set_xlabel("weights (file size)")
    left.set_ylabel("perplexity (lower is better)")
    left.set_title("perplexity per weight quant")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    ok = [v for v in variants if v.scenarios]
    width = 0.8 / max(len(scenarios), 1)
    for k, s in enumerate(scenarios):
        values = []
        for v in ok:
            match = [g for g in v.scenarios if (g.n_parallel, g.n_ctx) == (s.n_parallel, s.n_ctx)]
            values.append(match[0].gen_tokens_per_s if match else 0.0)
        right.barh([i + k * width for i in range(len(ok))], values, width, label=f"generation, {s.label}")
    # Bars across, labels level on the left: rotated labels under upright bars touched their neighbours.
    right.set_yticks([i + width * (len(scenarios) - 1) / 2 for i in range(len(ok))])
    right.set_yticklabels([f"{v.quant} / KV {v.kv}" for v in ok], fontsize=7)
    right.invert_yaxis()  # the first variant on top, as in the table
    right.set_xlabel("tokens/s (all streams)")
    right.set_title("generation speed per variant")
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- command line --------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [x.strip().lower() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge-llm bench", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None,
                        help="a GGUF (path or registry name) or an HF checkpoint folder (default: the demo model)")
    parser.add_argument("--config", default=None, help="a models.toml that adds to the built-in registry")
    parser.add_argument("--quants", type=_name_list, default=_name_list(DEFAULT_QUANTS),
                        help=f"weight quants to compare (default {DEFAULT_QUANTS}); TYPE{IMATRIX_SUFFIX}: quantized "
                             "with an importance matrix")
    parser.add_argument("--imatrix", default=None, metavar="FILE",
                        help=f"the importance matrix for TYPE{IMATRIX_SUFFIX} (default: computed from the source "
                             "with the shipped calibration text, once, kept in the work folder)")
    parser.add_argument("--kv", type=_name_list, default=_name_list(DEFAULT_KV),
                        help=f"KV cache types, used for K and V (default {DEFAULT_KV})")
    parser.add_argument("-np", "--parallel", dest="parallel", type=_int_list, default=[1, 8],
                        help="parallel sequences per scenario (default 1,8)")
    parser.add_argument("-c", "--ctx-size", dest="ctx", type=_int_list, default=None,
                        help="context per scenario, shared by its sequences (default 512,2048; one value = all)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    parser.add_argument("-f", "--file", default=None, help="text for perplexity (default: the shipped corpus)")
    parser.add_argument("--ppl-ctx", type=int, default=512, help="perplexity context (default 512)")
    parser.add_argument("--chunks", type=int, default=8, help="perplexity chunks (default 8; 0 = the whole text)")
    parser.add_argument("--n-prompt", type=int, default=256, help="prompt tokens for the prompt speed (default 256)")
    parser.add_argument("--n-gen", type=int, default=64, help="tokens generated per stream (default 64)")
    parser.add_argument("-o", "--out", default="bench-results", help="folder for bench.md, bench.json, bench.png")
    parser.add_argument("--chart", default=None, help="where to write the PNG (default OUT/bench.png)")
    parser.add_argument("--from-json", default=None, metavar="BENCH.json",
                        help="do not measure: redraw the table and chart from an earlier bench.json")
    parser.add_argument("--work-dir", default=None,
                        help="where quantized variants are kept between runs (default OUT/variants)")
    return parser


def load_results(path: str | Path) -> tuple[dict[str, Any], list[VariantResult], list[Scenario]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        variants = [VariantResult(**{**_current_names(v), "scenarios": [ScenarioResult(**s) for s in v["scenarios"]]})
                    for v in data["variants"]]
        scenarios = [Scenario(**s) for s in data["meta"]["scenarios"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeLLMError(f"cannot read bench results {path}: {exc}") from None
    return data["meta"], variants, scenarios


def _current_names(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant of results written before bench took llama-perplexity's KL divergence (docs/benchmarks.md's
    tables): `top1_agreement` is today's `same_top`; `mean_kl`, a KL over the reference's top 64
    tokens only, is not `mean_kld` and is left out rather than shown as one."""
    older = dict(variant)
    if "top1_agreement" in older:
        older["same_top"] = older.pop("top1_agreement")
    older.pop("mean_kl", None)
    return older


def replot(args: argparse.Namespace) -> int:
    meta, variants, scenarios = load_results(args.from_json)
    chart = Path(args.chart) if args.chart else Path(args.out) / "bench.png"
    write_chart(variants, scenarios, chart, f"{Path(meta['model']).name}: weight and KV-cache quantization")
    print(markdown_table(variants, scenarios))
    print(f"\nbench: wrote {chart}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        return replot(args)
    ctx = args.ctx or ([512, 2048] if args.parallel == [1, 8] else [512 * n for n in args.parallel])
    if len(ctx) == 1:
        ctx = ctx * len(args.parallel)
    if len(ctx) != len(args.parallel):
        raise InvalidParameterError("-c needs one value, or one per -np value", param="ctx")
    scenarios = [Scenario(n, c) for n, c in zip(args.parallel, ctx, strict=True)]
    for s in scenarios:
        if s.n_ctx // s.n_parallel < 64:
            raise InvalidParameterError(f"{s.label} leaves {s.n_ctx // s.n_parallel} tokens per sequence; "
                                        "raise -c", param="ctx")
    for kv in args.kv:
        kv_bytes_per_element(kv)
    check_quants(args.quants)
    if args.imatrix and not Path(args.imatrix).is_file():
        raise EdgeLLMError(f"imatrix file not found: {args.imatrix}")
    out = Path(args.out)
    # The results folder is made and checked before the long run, not after it.
    with os_errors(out, "create folder"):
        out.mkdir(parents=True, exist_ok=True)
    check_output_path(out / "bench.json")
    work_dir = Path(args.work_dir) if args.work_dir else out / "variants"
    model = args.model
    if model is None:
        from edge_llm.registry import demo_model_path

        model = str(demo_model_path())
    src = source_gguf(model, work_dir, args.config)
    variants = run_bench(src, args.quants, args.kv, scenarios, work_dir, ppl_ctx=args.ppl_ctx,
                         ppl_chunks=args.chunks or None, corpus=args.file, threads=args.threads,
                         n_prompt=args.n_prompt, n_gen=args.n_gen, imatrix=args.imatrix)
    table = markdown_table(variants, scenarios)
    meta = {"model": str(src), "scenarios": [asdict(s) for s in scenarios], "ppl_ctx": args.ppl_ctx,
            "ppl_chunks": args.chunks or None, "corpus": args.file or "edge_llm/data/genesis-kjv.txt",
            "threads": args.threads, "cpu_count": os.cpu_count(), "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "imatrix": args.imatrix or ("auto" if any(q.endswith(IMATRIX_SUFFIX) for q in args.quants) else None),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "variants": [asdict(v) for v in variants]}, indent=1),
                                    encoding="utf-8")
    command = "edge-llm bench " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "bench.md").write_text(f"`{command}`\n\n{table}\n", encoding="utf-8")
    chart = Path(args.chart) if args.chart else out / "bench.png"
    write_chart(variants, scenarios, chart, f"{src.name}: weight and KV-cache quantization")
    print(table)
    print(f"\nbench: wrote {out / 'bench.md'}, {out / 'bench.json'}, {chart}", file=sys.stderr)
    return 0


def _worker_entry(spec_json: str) -> int:
    try:
        result = worker_main(json.loads(spec_json))
    except EdgeLLMError as exc:
        result = {"error": exc.message}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--worker"] and len(argv) == 2:
        sys.exit(_worker_entry(argv[1]))
    sys.exit(main(argv))
