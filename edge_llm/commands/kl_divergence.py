"""KL divergence of a model (a quant) against a base model (its f16), as llama.cpp's
`llama-perplexity --kl-divergence-base FILE [--kl-divergence]` computes it (tools/perplexity/
perplexity.cpp), in its file format, so either program reads the other's base file.

The base file: "_logits_", n_ctx (u32), n_vocab (i32), n_chunk (i32), the n_chunk * n_ctx evaluated
tokens (i32), then for every scored position (the second half of each chunk, as perplexity scores
it) the base model's log-probabilities of the whole vocabulary as uint16 steps between the row's
minimum (at most 16 below the top) and its maximum: a record of 2 floats (scale, minimum log-prob)
and n_vocab uint16 values, padded to an even count. That is about 2 bytes per vocabulary entry and
position: 25 MB per 512-token chunk for a 49k vocabulary.

Per position, as llama-perplexity: KLD = sum over tokens whose base log-prob is above -16 of
p_base * (log p_base - log p_model); "same top" = both argmaxes equal; Δp = p_model(next token) -
p_base(next token). The arithmetic is float32 per term and float64 sums, as there.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_llm import files
from edge_llm.errors import EdgeLLMError

MAGIC = b"_logits_"
_ROWS = 32  # rows of the vocabulary processed at once: bounds the float temporaries


def record_size(n_vocab: int) -> int:
    """uint16 values per position: 4 for the two floats, n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _row_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's maximum and log-sum-exp from it (float32, the sum of expf terms in float64)."""
    peak = logits.max(axis=1)
    sum_exp = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
    return peak, np.log(sum_exp).astype(np.float32)


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """Rows of logits (float32) -> records of uint16 (rows, record_size), llama-perplexity's
    log_softmax(..., uint16_t * log_prob, ...)."""
    logits = np.asarray(logits, dtype=np.float32)
    n_rows, n_vocab = logits.shape
    out = np.zeros((n_rows, record_size(n_vocab)), dtype=np.uint16)
    for s in range(0, n_rows, _ROWS):
        x = logits[s:s + _ROWS]
        peak, lse = _row_stats(x)
        low = np.maximum(x.min(axis=1), peak - np.float32(16))
        min_log_prob = (low - peak - lse).astype(np.float32)
        scale = ((peak - low) / np.float32(65535)).astype(np.float32)
        header = np.stack([scale, min_log_prob], axis=1).astype(np.float32)
        out[s:s + _ROWS, :4] = header.view(np.uint16)
        with np.errstate(divide="ignore"):
            inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        steps = np.rint(inv[:, None] * (x - low[:, None]))  # nearest_int: round half to even, as the FPU
        out[s:s + _ROWS, 4:4 + n_vocab] = np.where(x > low[:, None], steps, 0).astype(np.uint16)
    return out


def decode_rows(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """Records -> base log-probs (float32, rows x n_vocab)."""
    header = np.ascontiguousarray(records[:, :4]).view(np.float32)
    return header[:, :1] * records[:, 4:4 + n_vocab].astype(np.float32) + header[:, 1:2]


def nll_of(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, as llama-perplexity returns it while saving a base."""
    peak, lse = _row_stats(np.asarray(logits, dtype=np.float32))
    return (peak + lse - logits[np.arange(len(targets)), targets]).astype(np.float64)


@dataclass
class KLDAccumulator:
    """llama-perplexity's kl_divergence_result, plus every position's KLD and Δp for percentiles."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, records: np.ndarray, targets: np.ndarray) -> None:
        """One chunk's scored rows: the model's logits, the base's records, the next tokens."""
        logits = np.asarray(logits, dtype=np.float32)
        n_vocab = logits.shape[1]
        for s in range(0, len(logits), _ROWS):
            x, rec, tok = logits[s:s + _ROWS], records[s:s + _ROWS], targets[s:s + _ROWS]
            rows = np.arange(len(x))
            peak, lse = _row_stats(x)
            base = decode_rows(rec, n_vocab)
            nll = (peak + lse - x[rows, tok]).astype(np.float32)
            nll_base = (-base[rows, tok]).astype(np.float32)
            norm = (peak + lse).astype(np.float32)
            terms = np.exp(base) * (base - x + norm[:, None])
            kld = np.where(base > np.float32(-16), terms, np.float32(0)).sum(axis=1, dtype=np.float64)
            p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
            n64, b64, d64 = nll.astype(np.float64), nll_base.astype(np.float64), p_diff.astype(np.float64)
            self.sum_nll += float(n64.sum())
            self.sum_nll2 += float((n64 * n64).sum())
            self.sum_nll_base += float(b64.sum())
            self.sum_nll_base2 += float((b64 * b64).sum())
            self.sum_nll_nll_base += float((n64 * b64).sum())
            self.sum_kld += float(kld.sum())
            self.sum_kld2 += float((kld * kld).sum())
            self.sum_p_diff += float(d64.sum())
            self.sum_p_diff2 += float((d64 * d64).sum())
            self.sum_p_diff4 += float((d64 ** 4).sum())
            self.n_same_top += int((x.argmax(axis=1) == base.argmax(axis=1)).sum())
            self.count += len(x)
            self.kld_values.append(kld.astype(np.float32))
            self.p_diff_values.append(p_diff)

    def result(self) -> KLDResult:
        n = self.count
        kld = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(0, np.float32)
        p_diff = np.sort(np.concatenate(self.p_diff_values)) if self.p_diff_values else np.zeros(0, np.float32)
        log_ppl, log_ppl_unc = mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        log_base, log_base_unc = mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        cov = covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        mean_kld, kld_unc = mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        mse, mse_unc = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n)
        same = self.n_same_top / n if n else 0.0
        return KLDResult(
            count=n, ppl=math.exp(log_ppl), ppl_uncertainty=math.exp(log_ppl) * log_ppl_unc,
            ppl_base=math.exp(log_base), ppl_base_uncertainty=math.exp(log_base) * log_base_unc,
            ln_ppl_ratio=log_ppl - log_base,
            ln_ppl_ratio_uncertainty=math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov, 0.0)),
            ln_ppl_correlation=cov / (log_ppl_unc * log_base_unc) if log_ppl_unc * log_base_unc > 0 else 0.0,
            mean_kld=mean_kld, mean_kld_uncertainty=kld_unc,
            kld_percentiles={name: percentile(kld, q) for name, q in KLD_PERCENTILES} if n else {},
            mean_p_diff=self.sum_p_diff / n if n else 0.0,
            rms_p_diff=math.sqrt(mse), rms_p_diff_uncertainty=0.5 / math.sqrt(mse) * mse_unc if mse > 0 else 0.0,
            p_diff_percentiles={name: percentile(p_diff, q) for name, q in P_DIFF_PERCENTILES} if n else {},
            same_top=same, same_top_uncertainty=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0)


KLD_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99.0", 0.99), ("95.0", 0.95), ("90.0", 0.9),
                   ("median", None), ("10.0", 0.1), ("5.0", 0.05), ("1.0", 0.01), ("0.1", 0.001), ("min", 0.0))
P_DIFF_PERCENTILES = (("max", 1.0), ("99.9", 0.999), ("99.0", 0.99), ("95.0", 0.95), ("90.0", 0.9),
                      ("75.0", 0.75), ("median", None), ("25.0", 0.25), ("10.0", 0.1), ("5.0", 0.05),
                      ("1.0", 0.01), ("0.1", 0.001), ("min", 0.0))


@dataclass
class KLDResult:
    count: int
    ppl: float
    ppl_uncertainty: float
    ppl_base: float
    ppl_base_uncertainty: float
    ln_ppl_ratio: float
    ln_ppl_ratio_uncertainty: float
    ln_ppl_correlation: float
    mean_kld: float
    mean_kld_uncertainty: float
    kld_percentiles: dict[str, float]
    mean_p_diff: float
    rms_p_diff: float
    rms_p_diff_uncertainty: float
    p_diff_percentiles: dict[str, float]
    same_top: float
    same_top_uncertainty: float

    def report(self) -> str:
        """The summary llama-perplexity prints after a --kl-divergence run."""
        ratio = math.exp(self.ln_ppl_ratio)
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl:10.6f} ± {self.ppl_uncertainty:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_uncertainty:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.ln_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio:10.6f} ± {self.ln_ppl_ratio_uncertainty:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {ratio:10.6f} ± {ratio * self.ln_ppl_ratio_uncertainty:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl - self.ppl_base:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.mean_kld:10.6f} ± {self.mean_kld_uncertainty:10.6f}",
        ]
        names = {"max": "Maximum", "median": "Median ", "min": "Minimum"}
        for name, value in self.kld_percentiles.items():
            label = names.get(name) or f"{name:>4}%".ljust(7)
            lines.append(f"{label} KLD: {value:10.6f}")
        lines += ["", "====== Token probability statistics ======",
                  f"Mean    Δp: {100 * self.mean_p_diff:6.3f} %"]
        for name, value in self.p_diff_percentiles.items():
            label = names.get(name) or f"{name:>4}%".ljust(7)
            lines.append(f"{label} Δp: {100 * value:6.3f}%")
        lines += [f"RMS Δp    : {100 * self.rms_p_diff:6.3f} ± {100 * self.rms_p_diff_uncertainty:5.3f} %",
                  f"Same top p: {100 * self.same_top:6.3f} ± {100 * self.same_top_uncertainty:5.3f} %"]
        return "\n".join(lines)


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


def covariance(a: float, b: float, ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float | None) -> float:
    """llama-perplexity's: linear between neighbours of a sorted list; None = its median."""
    n = len(sorted_values)
    if fraction is None:
        return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = np.float32(fraction) * np.float32(n - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, n - 1)])


# -- the base file ----------------------------------------------------------------------------------


class BaseWriter:
    """Writes a base file as chunks are evaluated: to a temporary name, renamed by `commit`."""

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, tokens: list[int], n_chunks: int) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        with files.os_errors(self.path, "write"):
            self.file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 -- closed by commit / discard
            self.file.write(MAGIC + struct.pack("<Iii", n_ctx, n_vocab, n_chunks))
            self.file.write(np.asarray(tokens[:n_chunks * n_ctx], dtype="<i4").tobytes())

    def add(self, logits: np.ndarray) -> None:
        with files.os_errors(self.path, "write"):
            self.file.write(encode_rows(logits).astype("<u2").tobytes())

    def commit(self) -> None:
        with files.os_errors(self.path, "write"):
            self.file.close()
            self.tmp.replace(self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class BaseFile:
    """A base file opened for reading: its header and tokens, records read chunk by chunk."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunks: int
    tokens: list[int]
    data_offset: int

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @classmethod
    def open(cls, path: str | Path) -> BaseFile:
        path = Path(path)
        with files.os_errors(path, "read"):
            with open(path, "rb") as f:
                head = f.read(20)
                if len(head) < 20 or head[:8] != MAGIC:
                    raise EdgeLLMError(f"{path} is not a KL-divergence base file (llama-perplexity's "
                                       "--kl-divergence-base format)")
                n_ctx, n_vocab, n_chunks = struct.unpack("<Iii", head[8:])
                if not (8 <= n_ctx <= 1 << 20 and 0 < n_vocab <= 1 << 24 and 0 < n_chunks <= 1 << 20):
                    raise EdgeLLMError(f"{path}: implausible header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                                       f"{n_chunks} chunks)")
                tokens = np.frombuffer(f.read(4 * n_ctx * n_chunks), dtype="<i4")
                size = path.stat().st_size
        base = cls(path, n_ctx, n_vocab, n_chunks, tokens.astype(np.int64).tolist(), 20 + 4 * n_ctx * n_chunks)
        expected = base.data_offset + n_chunks * base.scored_per_chunk * record_size(n_vocab) * 2
        if len(tokens) != n_ctx * n_chunks or size < expected:
            raise EdgeLLMError(f"{path} is truncated ({size} bytes, {expected} expected)")
        if min(base.tokens) < 0 or max(base.tokens) >= n_vocab:
            raise EdgeLLMError(f"{path}: a token id outside the vocabulary")
        return base

    def chunk_records(self, chunk: int) -> np.ndarray:
        per_chunk = self.scored_per_chunk * record_size(self.n_vocab)
        with files.os_errors(self.path, "read"):
            with open(self.path, "rb") as f:
                f.seek(self.data_offset + chunk * per_chunk * 2)
                data = f.read(per_chunk * 2)
        if len(data) != per_chunk * 2:
            raise EdgeLLMError(f"{self.path} is truncated")
        return np.frombuffer(data, dtype="<u2").reshape(self.scored_per_chunk, record_size(self.n_vocab))


class ChunkTable:
    """llama-perplexity's per-chunk lines in --kl-divergence mode."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream

    def __call__(self, i: int, acc: KLDAccumulator) -> None:
        if i == 0:
            print("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                  "              Δp RMS            Same top p", file=self.stream)
        log_ppl, log_ppl_unc = mean_and_uncertainty(acc.sum_nll, acc.sum_nll2, acc.count)
        log_base, log_base_unc = mean_and_uncertainty(acc.sum_nll_base, acc.sum_nll_base2, acc.count)
        cov = covariance(acc.sum_nll, acc.sum_nll_base, acc.sum_nll_nll_base, acc.count)
        kld, kld_unc = mean_and_uncertainty(acc.sum_kld, acc.sum_kld2, acc.count)
        mse, mse_unc = mean_and_uncertainty(acc.sum_p_diff2, acc.sum_p_diff4, acc.count)
        same = acc.n_same_top / acc.count
        ppl = math.exp(log_ppl)
        print(f"{i + 1:4d}    {ppl:9.4f} ± {ppl * log_ppl_unc:9.4f}"
              f"    {log_ppl - log_base:10.5f} ± {math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov, 0)):10.5f}"
              f"    {kld:10.5f} ± {kld_unc:10.5f}"
              f"    {100 * math.sqrt(mse):6.3f} ± {100 * (0.5 / math.sqrt(mse) * mse_unc if mse > 0 else 0):6.3f} %"
              f"    {100 * same:6.3f} ± {100 * math.sqrt(same * (1 - same) / max(acc.count - 1, 1)):6.3f} %",
              file=self.stream, flush=True)
