"""SamplingParams on a torch logits vector, for the transformers engine.

The chain and its order are llama.cpp's (and so the default engine's): logit bias for
ignore_eos, penalties, then greedy, or top-k -> top-p -> min-p -> temperature -> a draw from a
seeded generator. Keeping the same order means the same parameters sample from the same
distribution on both engines (transformers' own generate() applies temperature first).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from edge_llm.sampling import SamplingParams


class TokenSampler:
    """Picks the next token of one choice; keeps the choice's own generator and history."""

    def __init__(self, params: SamplingParams, prompt: list[int], *, eog_ids: Iterable[int], seed: int,
                 n_ctx: int) -> None:
        self.params = params
        self.prompt = prompt
        self.generated: list[int] = []
        self._eog = sorted(eog_ids) if params.ignore_eos else []
        self._window = n_ctx if params.penalty_last_n < 0 else params.penalty_last_n
        # Drawn on the CPU so a seed gives the same text on CPU and CUDA.
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed & 0xFFFFFFFF)

    def accept(self, token: int) -> None:
        self.generated.append(token)

    def sample(self, raw_logits: torch.Tensor) -> int:
        params = self.params
        logits = raw_logits.detach().to("cpu", torch.float32).clone()
        if params.logit_bias:
            ids = [t for t in params.logit_bias if t < logits.numel()]
            logits[ids] += torch.tensor([params.logit_bias[t] for t in ids], dtype=logits.dtype)
        if self._eog:
            logits[self._eog] = float("-inf")
        self._apply_penalties(logits)
        if params.greedy:
            return int(torch.argmax(logits))
        if params.top_k > 0 and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if params.top_p < 1.0:
            logits = _top_p(logits, params.top_p)
        if params.min_p > 0.0:
            # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
            threshold = logits.max() + torch.log(torch.tensor(params.min_p))
            logits[logits < threshold] = float("-inf")
        probs = torch.softmax(logits / params.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _apply_penalties(self, logits: torch.Tensor) -> None:
        """vLLM's meaning, within llama.cpp's window of the last `penalty_last_n` tokens: the
        repetition penalty covers prompt and output, presence/frequency penalties the output."""
        params = self.params
        if not self._window:
            return
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set((self.prompt + self.generated)[-self._window:])), dtype=torch.long)
            if seen.numel():
                values = logits[seen]
                logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                           values * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and self.generated:
            recent = torch.tensor(self.generated[-self._window:], dtype=torch.long)
            counts = torch.bincount(recent, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
            logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches top_p (the one crossing it included)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # A token is dropped when the mass before it already reached top_p; the first always stays.
    drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop[0] = False
    out = logits.clone()
    out[order[drop]] = float("-inf")
    return out


def log_softmax(raw_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the model's own distribution (before any sampling step), as
    llama.cpp and vLLM report them."""
    return torch.log_softmax(raw_logits.detach().to("cpu", torch.float64), dim=-1)
