"""`edge-llm quantize`: every llama.cpp type that needs no importance matrix, imatrix files in both
formats, and bad inputs."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import run_cli
from tiny_models import build_llama, llama_cpp_logits, train_sentencepiece

from edge_llm.quantize import NEEDS_IMATRIX, default_output, load_imatrix, quant_types, quantize_file

pytestmark = pytest.mark.slow

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
         "q5_k_s", "q5_k_m", "q6_k", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs", "bf16", "f16"]


def min_cosine(qtype: str) -> float:
    """Closeness to the f32 logits, by bits per weight (measured on this model: q2_k 0.89, q3_k_s 0.94,
    iq3_s 0.92, q4_0 0.98, q5_0 0.995, q6_k 0.999, q8_0 1.000)."""
    for prefixes, bound in ((("f16", "bf16", "q8"), 0.999), (("q5", "q6"), 0.99), (("q4", "iq4"), 0.97),
                            (("q3_k_m", "q3_k_l", "iq3_m"), 0.95), (("q3", "iq3"), 0.9), (("q2",), 0.85)):
        if qtype.startswith(prefixes):
            return bound
    raise AssertionError(qtype)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """A tiny Llama as f32 GGUF, with 256-wide rows so the K-quants apply without fallbacks."""
    from edge_llm.convert import convert

    root = tmp_path_factory.mktemp("quant")
    tiny = build_llama(root / "llama", train_sentencepiece(root / "spm"), hidden_size=256, intermediate_size=512,
                       initializer_range=0.02)
    ids = tiny.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    return convert(tiny.path, root / "tiny-f32.gguf", outtype="f32"), ids


def _file_type(path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).get_field("general.file_type").contents())


@pytest.mark.parametrize("qtype", TYPES)
def test_every_type(qtype, f32_gguf, tmp_path):
    src, ids = f32_gguf
    out = run_cli("quantize", str(src), qtype, "-o", str(tmp_path / f"m-{qtype}.gguf"), "-t", "2")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.strip() == str(tmp_path / f"m-{qtype}.gguf")
    assert _file_type(tmp_path / f"m-{qtype}.gguf") == quant_types()[qtype]
    ref, got = llama_cpp_logits(src, ids), llama_cpp_logits(tmp_path / f"m-{qtype}.gguf", ids)
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.mean() > min_cosine(qtype), cos.mean()
    assert [p.name for p in tmp_path.iterdir()] == [f"m-{qtype}.gguf"]


def test_cli_writes_what_the_library_writes(f32_gguf, tmp_path):
    """The CLI is llama.cpp's quantizer: same bytes as calling it directly; default name beside the input."""
    src, _ = f32_gguf
    direct = quantize_file(src, tmp_path / "direct.gguf", "q4_k_m")
    out = run_cli("quantize", str(src), "Q4_K_M")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(src.with_name("tiny-q4_k_m.gguf"))
    assert src.with_name("tiny-q4_k_m.gguf").read_bytes() == direct.read_bytes()
    assert default_output(src.with_name("x.gguf"), "q8_0").name == "x-q8_0.gguf"


def _write_gguf_imatrix(path, src, counts: float = 4.0):
    import gguf

    w = gguf.GGUFWriter(path, "imatrix")
    w.add_array("imatrix.datasets", ["test"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 16)
    rng = np.random.default_rng(0)
    sums = {}
    for t in gguf.GGUFReader(src).tensors:
        if len(t.shape) == 2:
            ncols = int(t.shape[0])
            sums[t.name] = rng.uniform(0.1, 10.0, size=(1, ncols)).astype(np.float32) * counts
            w.add_tensor(f"{t.name}.in_sum2", sums[t.name])
            w.add_tensor(f"{t.name}.counts", np.full((1, 1), counts, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: (s / counts).reshape(-1) for name, s in sums.items()}


def test_imatrix_gguf_and_legacy(f32_gguf, tmp_path):
    src, ids = f32_gguf
    expected = _write_gguf_imatrix(tmp_path / "imatrix.gguf", src)
    matrix = load_imatrix(tmp_path / "imatrix.gguf")
    assert matrix.datasets == ["test"] and matrix.chunk_count == 1
    loaded = matrix.entries
    assert sorted(loaded) == sorted(expected)
    assert all(np.allclose(loaded[k], expected[k]) for k in expected)

    legacy = bytearray(struct.pack("<i", len(expected)))
    for name, values in expected.items():  # legacy .dat stores mean * ncall
        legacy += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 3, values.size)
        legacy += (values * 3).astype(np.float32).tobytes()
    (tmp_path / "imatrix.dat").write_bytes(bytes(legacy))
    from_dat = load_imatrix(tmp_path / "imatrix.dat").entries
    assert all(np.allclose(from_dat[k], expected[k], rtol=1e-6) for k in expected)

    # IQ2_XS refuses to run without one; with it, llama.cpp quantizes and the model still works.
    out = run_cli("quantize", str(src), "iq2_xs", "-o", str(tmp_path / "iq2.gguf"), "--imatrix",
                  str(tmp_path / "imatrix.gguf"))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # given a matrix, nothing is computed
    assert _file_type(tmp_path / "iq2.gguf") == quant_types()["iq2_xs"]
    assert np.isfinite(llama_cpp_logits(tmp_path / "iq2.gguf", ids)).all()
    # The importance weights change the rounding: not the same file as without them.
    plain = quantize_file(src, tmp_path / "plain.gguf", "q4_k_m")
    weighted = quantize_file(src, tmp_path / "weighted.gguf", "q4_k_m", imatrix=tmp_path / "imatrix.dat")
    assert plain.read_bytes() != weighted.read_bytes()


def test_bad_inputs(f32_gguf, tmp_path):
    src, _ = f32_gguf
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf" * 10)
    cases = [
        ((str(tmp_path / "missing.gguf"), "q4_0"), f"model file not found: {tmp_path / 'missing.gguf'}"),
        ((str(junk), "q4_0"), "is not a GGUF file"),
        ((str(src), "q9_k"), "unknown quant type 'q9_k'"),
        ((str(src), "q4_0", "--imatrix", str(tmp_path / "none.gguf")), "imatrix file not found"),
        ((str(src), "q4_0", "--tensor-type", "attn_v"), "expected PATTERN=TYPE"),
        ((str(src), "q4_0", "--tensor-type", "attn_v=q9_k"), "unknown ggml type 'q9_k'"),
        ((str(src), "q4_0", "--output-tensor-type", "int7"), "--output-tensor-type: unknown ggml type 'int7'"),
        ((str(src), "q4_0", "-o", str(src)), "would overwrite the input"),
        ((str(src), "q4_0", "--imatrix", str(junk)), "not a valid imatrix file"),
        ((str(src), "q4_0", "-o", str(tmp_path / "no" / "x.gguf")),
         f"cannot write {tmp_path / 'no' / 'x.gguf'}: folder {tmp_path / 'no'} does not exist"),
        ((str(src), "q4_0", "-o", str(junk / "x.gguf")),
         f"cannot write {junk / 'x.gguf'}: folder {junk} is a file, not a folder"),
    ]
    for args, fragment in cases:
        out = run_cli("quantize", *args)
        assert out.returncode == 1, (args, out.stderr)
        assert fragment in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]
    assert set(NEEDS_IMATRIX) <= set(quant_types())


def test_output_into_a_folder_or_a_read_only_one(f32_gguf, tmp_path, read_only_folder):
    """-o FOLDER writes the default name there (as convert does); a folder that cannot be written
    is one line before any work, and leaves nothing."""
    src, _ = f32_gguf
    folder = tmp_path / "models"
    folder.mkdir()
    out = run_cli("quantize", str(src), "q8_0", "-o", str(folder))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder / default_output(src, "q8_0").name)
    assert [p.name for p in folder.iterdir()] == [default_output(src, "q8_0").name]

    locked, run = read_only_folder
    out = run("quantize", str(src), "q8_0", "-o", str(locked / "m.gguf"))
    assert out.returncode == 1
    assert out.stderr == f"edge-llm quantize: error: cannot write {locked / 'm.gguf'}: Permission denied\n"
    assert list(locked.iterdir()) == []


def test_model_references_and_llama_quantizes_argument_order(f32_gguf, tmp_path, demo_path):
    """A registry name works as the input (its output goes to the current folder, not into the
    package); requantizing says which flag allows it; `IN OUT TYPE` as llama-quantize takes them."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    def quantize(*args: str):
        return subprocess.run([sys.executable, "-m", "edge_llm", "quantize", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)

    refused = quantize("smollm2-135m", "q8_0")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert f"{demo_path} is already quantized (q4_1)" in refused.stderr
    assert "pass --allow-requantize" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    done = quantize("smollm2-135m", "q8_0", "--allow-requantize", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SmolLM2-135M-Instruct-q8_0.gguf"
    assert _file_type(tmp_path / "SmolLM2-135M-Instruct-q8_0.gguf") == quant_types()["q8_0"]

    src, _ = f32_gguf
    out = quantize(str(src), "positional.gguf", "q4_0")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "positional.gguf").read_bytes() == quantize_file(src, tmp_path / "lib.gguf", "q4_0").read_bytes()


def test_types_that_need_an_imatrix_get_one(f32_gguf, tmp_path):
    """No --imatrix for iq2_xxs: one is computed from the input over the shipped text (as --imatrix auto),
    recorded in the output's metadata, and removed; the model still works."""
    from gguf import GGUFReader

    src, ids = f32_gguf
    out = run_cli("quantize", str(src), "iq2_xxs", "-o", str(tmp_path / "iq2.gguf"), timeout=900)
    assert out.returncode == 0, out.stderr
    assert "computing an importance matrix of tiny-f32.gguf for iq2_xxs" in out.stderr
    assert _file_type(tmp_path / "iq2.gguf") == quant_types()["iq2_xxs"]
    assert np.isfinite(llama_cpp_logits(tmp_path / "iq2.gguf", ids)).all()
    meta = {f.name: f.contents() for f in GGUFReader(tmp_path / "iq2.gguf").fields.values()
            if f.name.startswith("quantize.")}
    assert meta["quantize.imatrix.file"] == "auto"
    assert meta["quantize.imatrix.dataset"] == "edge_llm/data/calibration.txt"
    assert meta["quantize.imatrix.chunks_count"] == 64 and meta["quantize.imatrix.entries_count"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["iq2.gguf"]


def test_convert_quantizes_with_an_imatrix(f32_gguf, tmp_path):
    """convert --quant TYPE --imatrix FILE: the matrix reaches llama.cpp (recorded in the metadata) and the
    quant differs from the one made without it; --imatrix without --quant is one error line."""
    from gguf import GGUFReader

    from edge_llm.imatrix import Entry, write_imatrix

    src, _ = f32_gguf
    hf_dir = src.parent / "llama"
    rng = np.random.default_rng(1)
    entries = {t.name: Entry(rng.uniform(0.1, 5, size=(1, int(t.shape[0]))).astype(np.float32), np.array([64]))
               for t in GGUFReader(src).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    matrix = write_imatrix(tmp_path / "m.gguf", entries, datasets=["random"], chunk_count=1, chunk_size=64)
    out = run_cli("convert", str(hf_dir), "--quant", "q4_k_m", "--imatrix", str(matrix), "-o", str(tmp_path / "w.gguf"))
    assert out.returncode == 0, out.stderr
    meta = {f.name: f.contents() for f in GGUFReader(tmp_path / "w.gguf").fields.values()}
    assert meta["quantize.imatrix.file"] == str(matrix) and meta["quantize.imatrix.dataset"] == "random"
    assert meta["quantize.imatrix.entries_count"] == len(entries)
    plain = run_cli("convert", str(hf_dir), "--quant", "q4_k_m", "-o", str(tmp_path / "p.gguf"))
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "w.gguf").read_bytes() != (tmp_path / "p.gguf").read_bytes()
    bad = run_cli("convert", str(hf_dir), "--imatrix", str(matrix), "-o", str(tmp_path / "x.gguf"))
    assert bad.returncode == 1 and "--imatrix is for --quant TYPE" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "p.gguf", "w.gguf"]
