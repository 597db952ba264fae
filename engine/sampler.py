"""Turn one step's logits into one token per sequence.

Per row: raw log-probs (if asked) -> penalties -> min_tokens -> greedy argmax, or
temperature / top-k / top-p / min-p and an exponential race. The race picks
argmax(p_i / q_i) with q_i ~ Exp(1), which draws token i with probability p_i; it
needs no normalised probabilities and no cumulative sum, and its noise is a plain
[V] tensor that a per-token key can reproduce exactly.

Noise is always drawn on the CPU so a seeded request gets the same tokens on any
device, alone or in any batch, in any process.
"""

import hashlib
from dataclasses import dataclass

import torch

from engine.sequence import Sequence, TokenLogprob

# Dividing by a denormal temperature would overflow to inf and turn softmax into NaN;
# below this the distribution is one-hot for any practical logits anyway.
_MIN_TEMPERATURE = 1e-6
# exponential_ may return exactly 0, and p / 0 would beat every real candidate.
_MIN_NOISE = torch.finfo(torch.float32).tiny


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None  # None unless seq.params.logprobs is not None


def noise_key(seed: int, sample_index: int, position: int) -> int:
    """A 63-bit generator seed for one token of one seeded sample.

    Hashing the text of the three ints accepts any Python int (negative or huge
    seeds) and differs for every position, so no two tokens share noise.
    """
    text = f"{seed}:{sample_index}:{position}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _Plan:
    """Which rows need which work; most steps leave every list empty."""

    penalized: list[int]
    blocked: list[int]  # min_tokens not reached yet: stop tokens are forbidden
    logprobs: list[int]
    sampled: list[int]  # temperature > 0

    @property
    def plain_argmax(self) -> bool:
        return not (self.penalized or self.blocked or self.logprobs or self.sampled)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0):
        self.eos_token_ids = tuple(eos_token_ids)
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"expected logits [{len(seqs)}, V], got {tuple(logits.shape)}")
        plan = _plan(seqs)
        if plan.plain_argmax:
            # bf16/fp16 -> float32 is exact, so argmax on the raw dtype is the same
            # answer without copying the batch.
            return [SampledToken(t, None) for t in logits.argmax(dim=-1).tolist()]
        raw = logits.float()
        raw_logprobs = _raw_logprobs(raw, plan.logprobs)
        work = self._processed(raw, logits, seqs, plan)
        tokens = work.argmax(dim=-1)
        if plan.sampled:
            rows = torch.tensor(plan.sampled, device=work.device)
            tokens[rows] = self._sample(work, seqs, plan.sampled, rows)
        token_list = tokens.tolist()
        chosen = _logprob_results(raw_logprobs, tokens, seqs, plan.logprobs)
        return [SampledToken(t, chosen.get(i)) for i, t in enumerate(token_list)]

    def _processed(self, raw: torch.Tensor, original: torch.Tensor, seqs: list[Sequence],
                   plan: _Plan) -> torch.Tensor:
        """Logits after penalties and min_tokens; the caller's tensor is never written."""
        if not (plan.penalized or plan.blocked):
            return raw
        work = raw.clone() if raw is original else raw  # .float() already copied bf16
        for i in plan.penalized:
            _apply_penalties(work[i], seqs[i])
        for i in plan.blocked:
            self._block_stops(work[i], seqs[i])
        return work

    def _block_stops(self, row: torch.Tensor, seq: Sequence) -> None:
        # With ignore_eos an EOS neither stops the sequence nor counts as a stop, so
        # it is an ordinary token and min_tokens has no reason to forbid it.
        eos = () if seq.params.ignore_eos else self.eos_token_ids
        ids = [t for t in (*eos, *seq.params.stop_token_ids) if t < row.shape[0]]
        if ids:
            row[ids] = float("-inf")

    def _sample(self, work: torch.Tensor, seqs: list[Sequence], sampled: list[int],
                rows: torch.Tensor) -> torch.Tensor:
        """Token ids for the non-greedy rows, in the order of `sampled`."""
        params = [seqs[i].params for i in sampled]
        temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
        x = work.index_select(0, rows)  # a copy, so dividing in place is safe
        x.div_(torch.tensor(temps, device=x.device).unsqueeze(1))
        _apply_top_k(x, [p.top_k for p in params])
        _apply_top_p(x, [p.top_p for p in params])
        probs = x.softmax(dim=-1)
        _apply_min_p(probs, [p.min_p for p in params])
        noise = self._noise(seqs, sampled, x.shape[1]).to(x.device)
        return probs.div_(noise).argmax(dim=-1)

    def _noise(self, seqs: list[Sequence], sampled: list[int], vocab: int) -> torch.Tensor:
        """Exp(1) noise [len(sampled), V] on the CPU: per-token keyed for seeded rows,
        one draw from the sampler's own generator for the rest."""
        unseeded = [j for j, i in enumerate(sampled) if seqs[i].params.seed is None]
        shared = torch.empty(len(unseeded), vocab).exponential_(generator=self.generator)
        if len(unseeded) == len(sampled):
            return shared.clamp_min_(_MIN_NOISE)
        noise = torch.empty(len(sampled), vocab)
        if unseeded:
            noise[unseeded] = shared
        for j, i in enumerate(sampled):
            seq = seqs[i]
            if seq.params.seed is not None:
                key = noise_key(seq.params.seed, seq.sample_index, seq.num_tokens)
                noise[j].exponential_(generator=torch.Generator("cpu").manual_seed(key))
        return noise.clamp_min_(_MIN_NOISE)


def _plan(seqs: list[Sequence]) -> _Plan:
    plan = _Plan([], [], [], [])
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.needs_penalties:
            plan.penalized.append(i)
        if seq.num_output_tokens < p.min_tokens:
            plan.blocked.append(i)
        if p.logprobs is not None:
            plan.logprobs.append(i)
        if not p.greedy:
            plan.sampled.append(i)
    return plan


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """Repetition (HF) over prompt + output, then presence/frequency (OpenAI) over output."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_token_ids())), device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, device=row.device)
        ids, counts = out.unique(return_counts=True)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts.float()


def _apply_top_k(x: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's k largest logits (ties with the k-th are kept too)."""
    vocab = x.shape[1]
    ks = [vocab if k == -1 else min(k, vocab) for k in top_k]
    rows = [j for j, k in enumerate(ks) if k < vocab]
    if not rows:
        return
    sub = x[rows]
    k = torch.tensor([ks[j] for j in rows], device=x.device)
    kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    x[rows] = sub.masked_fill_(sub < kth, float("-inf"))


def _apply_top_p(x: torch.Tensor, top_p: list[float]) -> None:
    """Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.

    Only rows with top_p < 1 are sorted: a float cumsum can reach 1.0 before the
    tail, so running top_p=1 rows through here could drop tokens depending on
    which other rows happen to share the batch.
    """
    rows = [j for j, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return
    sub = x[rows]
    sorted_x, order = sub.sort(dim=-1, descending=True, stable=True)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # exactly 0 for the top token
    limit = torch.tensor([top_p[j] for j in rows], device=x.device).unsqueeze(1)
    drop = torch.empty_like(order, dtype=torch.bool).scatter_(1, order, mass_before >= limit)
    x[rows] = sub.masked_fill_(drop, float("-inf"))


def _apply_min_p(probs: torch.Tensor, min_p: list[float]) -> None:
    """Zero tokens less likely than min_p times the row's top token.

    Zeroing without renormalising is enough: the race is scale-invariant per row.
    """
    if not any(m > 0 for m in min_p):
        return
    scale = torch.tensor(min_p, device=probs.device).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True).mul_(scale)
    probs.masked_fill_(probs < threshold, 0.0)


def _raw_logprobs(raw: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
    """log_softmax of the unprocessed logits for the rows that asked for logprobs."""
    if not rows:
        return None
    return torch.log_softmax(raw[rows], dim=-1)


def _logprob_results(raw_logprobs: torch.Tensor | None, tokens: torch.Tensor,
                     seqs: list[Sequence], rows: list[int]) -> dict[int, TokenLogprob]:
    """Row index -> the chosen token's raw logprob and its top-N alternatives."""
    if raw_logprobs is None:
        return {}
    chosen_ids = tokens[rows]
    chosen = raw_logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    most = max(seqs[i].params.logprobs for i in rows)
    if most:
        top_vals, top_ids = (t.tolist() for t in raw_logprobs.topk(most, dim=-1))
    else:
        top_vals = top_ids = [[] for _ in rows]
    results = {}
    for j, (i, token_id) in enumerate(zip(rows, chosen_ids.tolist(), strict=True)):
        n = seqs[i].params.logprobs
        top = dict(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        results[i] = TokenLogprob(token_id, chosen[j], top)
    return results
