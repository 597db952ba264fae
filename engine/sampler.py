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
from collections import Counter
from dataclasses import dataclass
from itertools import chain

import torch

from engine.sequence import Sequence, TokenLogprob

# Dividing by a denormal temperature would overflow to inf and turn softmax into NaN;
# below this the distribution is one-hot for any practical logits anyway.
_MIN_TEMPERATURE = 1e-6
# The most a repetition penalty may scale a logit by: far enough from float32's limits
# that a scaled logit over the smallest temperature stays finite.
_MIN_PENALTY = 1e-20
# U in [0, 1) keeps -log(U) > 0, but were q ever 0, p / 0 would beat every real token.
_MIN_NOISE = torch.finfo(torch.float32).tiny
# Candidates examined for top-p, widening, before sorting the whole row.
_TOP_P_CANDIDATES = (256, 4096)


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
    biased: list[int]
    constrained: list[int]  # a grammar says which tokens may come next
    blocked: list[int]  # min_tokens not reached yet: stop tokens are forbidden
    logprobs: list[int]
    sampled: list[int]  # temperature > 0

    @property
    def plain_argmax(self) -> bool:
        return not (self.penalized or self.biased or self.constrained or self.blocked
                    or self.logprobs or self.sampled)


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
        tokens = self._pick(work, seqs, plan.sampled)
        token_list = tokens.tolist()
        chosen = _logprob_results(raw_logprobs, tokens, seqs, plan.logprobs)
        return [SampledToken(t, chosen.get(i)) for i, t in enumerate(token_list)]

    def _processed(self, raw: torch.Tensor, original: torch.Tensor, seqs: list[Sequence],
                   plan: _Plan) -> torch.Tensor:
        """Logits after logit bias, grammar, penalties and min_tokens; the caller's tensor
        is never written."""
        if not (plan.penalized or plan.biased or plan.constrained or plan.blocked):
            return raw
        work = raw.clone() if raw is original else raw  # .float() already copied bf16
        for i in plan.biased:
            ids, biases = zip(*seqs[i].params.logit_bias, strict=True)
            ids = torch.tensor(ids, device=work.device)
            known = ids < work.shape[1]
            work[i, ids[known]] += torch.tensor(biases, device=work.device)[known]
        for i in plan.constrained:
            allowed = seqs[i].matcher.allowed().to(work.device)
            work[i, :allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
            work[i, allowed.shape[0]:] = float("-inf")
        if plan.penalized:
            _apply_repetition(work, seqs, plan.penalized)
            _apply_presence_frequency(work, seqs, plan.penalized)
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

    def _pick(self, work: torch.Tensor, seqs: list[Sequence], sampled: list[int]):
        """Token per row: argmax for greedy rows, a draw for the `sampled` rows."""
        if len(sampled) == len(seqs):
            return self._sample(work, seqs, sampled)
        tokens = work.argmax(dim=-1)
        if sampled:
            tokens[sampled] = self._sample(work, seqs, sampled)
        return tokens

    def _sample(self, work: torch.Tensor, seqs: list[Sequence],
                sampled: list[int]) -> torch.Tensor:
        """Token ids for the non-greedy rows, in the order of `sampled`."""
        params = [seqs[i].params for i in sampled]
        temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
        temps = torch.tensor(temps, device=work.device).unsqueeze(1)
        # Both forms leave `work` untouched. Not index_select: with two threads on a
        # fresh buffer it was far slower than plain indexing (docs/performance.md,
        # Measurements behind the code).
        x = work / temps if len(sampled) == len(seqs) else work[sampled].div_(temps)
        _apply_top_k(x, [p.top_k for p in params])
        _apply_top_p(x, [p.top_p for p in params])
        probs = x.softmax(dim=-1)
        _apply_min_p(probs, [p.min_p for p in params])
        noise = self._noise(seqs, sampled, x.shape[1]).to(x.device)
        return probs.div_(noise).argmax(dim=-1)

    def _noise(self, seqs: list[Sequence], sampled: list[int], vocab: int) -> torch.Tensor:
        """Exp(1) noise [len(sampled), V] on the CPU: per-token keyed for seeded rows,
        one draw from the sampler's own generator for the rest."""
        noise = torch.empty(len(sampled), vocab)
        unseeded = [j for j, i in enumerate(sampled) if seqs[i].params.seed is None]
        if len(unseeded) == len(sampled):
            noise.uniform_(generator=self.generator)
        else:
            if unseeded:
                shared = torch.empty(len(unseeded), vocab).uniform_(generator=self.generator)
                noise[unseeded] = shared
            for j, i in enumerate(sampled):
                seq = seqs[i]
                if seq.params.seed is not None:
                    key = noise_key(seq.params.seed, seq.sample_index, seq.num_tokens)
                    noise[j].uniform_(generator=torch.Generator("cpu").manual_seed(key))
        # -log(U) is Exp(1) and cheaper on the CPU than Tensor.exponential_.
        # U == 0 gives q = inf, which only makes that token lose.
        return noise.log_().neg_().clamp_min_(_MIN_NOISE)


def plain_argmax(seq: Sequence) -> bool:
    """Whether the sampler's token for `seq` now is the plain argmax of its logits."""
    return _plan([seq]).plain_argmax


def _plan(seqs: list[Sequence]) -> _Plan:
    plan = _Plan([], [], [], [], [], [])
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.needs_penalties:
            plan.penalized.append(i)
        if p.logit_bias:
            plan.biased.append(i)
        if seq.matcher is not None:
            plan.constrained.append(i)
        if seq.num_output_tokens < p.min_tokens:
            plan.blocked.append(i)
        if p.logprobs is not None:
            plan.logprobs.append(i)
        if not p.greedy:
            plan.sampled.append(i)
    return plan


def _apply_repetition(work: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """HF repetition penalty over each row's prompt + output tokens, all rows at once."""
    rows = [i for i in rows if seqs[i].params.repetition_penalty != 1.0]
    if not rows:
        return
    seen = [set(seqs[i].prompt_token_ids).union(seqs[i].output_token_ids) for i in rows]
    sizes = torch.tensor([len(ids) for ids in seen])
    penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rows])
    # Beyond this range float32 fails: a logit over a penalty near 0 overflows to inf
    # (softmax of the row is then NaN), a masked token's -inf times a penalty that
    # rounds to 0 is NaN, and a NaN wins the draw whatever the grammar allows. Within
    # it a seen token already beats (or loses to) every other.
    penalty.clamp_(_MIN_PENALTY, 1 / _MIN_PENALTY)
    where = _flat_index(rows, sizes, seen, work.device)
    penalty = penalty.repeat_interleave(sizes).to(work.device)
    vals = work[where]
    work[where] = torch.where(vals > 0, vals / penalty, vals * penalty)


def _apply_presence_frequency(work: torch.Tensor, seqs: list[Sequence],
                              rows: list[int]) -> None:
    """OpenAI penalties over output tokens only: presence once, frequency per use."""
    rows = [i for i in rows if seqs[i].output_token_ids
            and (seqs[i].params.presence_penalty or seqs[i].params.frequency_penalty)]
    if not rows:
        return
    counts = [Counter(seqs[i].output_token_ids) for i in rows]
    sizes = torch.tensor([len(c) for c in counts])
    presence = torch.tensor([seqs[i].params.presence_penalty for i in rows])
    frequency = torch.tensor([seqs[i].params.frequency_penalty for i in rows])
    uses = torch.tensor(list(chain.from_iterable(c.values() for c in counts)))
    where = _flat_index(rows, sizes, counts, work.device)
    penalty = presence.repeat_interleave(sizes) + frequency.repeat_interleave(sizes) * uses
    work[where] -= penalty.to(work.device)


def _flat_index(rows: list[int], sizes: torch.Tensor, token_sets, device: torch.device):
    """(row, token) index pairs for every token of every row, for one batched write.

    Each row's tokens are distinct, so no pair repeats and plain assignment is safe.
    """
    row_ids = torch.tensor(rows).repeat_interleave(sizes)
    token_ids = torch.tensor(list(chain.from_iterable(token_sets)))
    return row_ids.to(device), token_ids.to(device)


def _apply_top_k(x: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's k largest logits (ties with the k-th are kept too)."""
    vocab = x.shape[1]
    ks = [vocab if k == -1 else min(k, vocab) for k in top_k]
    rows = [j for j, k in enumerate(ks) if k < vocab]
    if not rows:
        return
    sub = _select(x, rows)
    k = torch.tensor([ks[j] for j in rows], device=x.device)
    kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    _write_back(x, rows, sub.masked_fill_(sub < kth, float("-inf")))


def _apply_top_p(x: torch.Tensor, top_p: list[float]) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p.

    Only rows with top_p < 1 take part: a float cumsum can reach 1.0 before the
    tail, so running top_p=1 rows through here could drop tokens depending on
    which other rows happen to share the batch.
    """
    rows = [j for j, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return
    sub = _select(x, rows)
    probs = sub.softmax(dim=-1)
    limit = torch.tensor([top_p[j] for j in rows], device=x.device).unsqueeze(1)
    # Sorting a whole 49k row costs far more than a top-256. The nucleus usually fits in the
    # first candidates; rows whose nucleus may not are redone with more, then all.
    vocab = probs.shape[1]
    drop, spills = _outside_nucleus(probs, limit, min(_TOP_P_CANDIDATES[0], vocab))
    redo = spills.nonzero().squeeze(1)
    for k in (*_TOP_P_CANDIDATES[1:], vocab):
        if redo.numel() == 0:
            break
        drop[redo], spills = _outside_nucleus(probs[redo], limit[redo], min(k, vocab))
        redo = redo[spills]
    _write_back(x, rows, sub.masked_fill_(drop, float("-inf")))


def _outside_nucleus(probs: torch.Tensor, limit: torch.Tensor, k: int):
    """Tokens outside each row's nucleus, judged among its k most likely tokens, and
    which rows kept all k (their nucleus may go on past them)."""
    top_probs, top_ids = probs.topk(k, dim=-1)  # sorted, most likely first
    mass_before = top_probs.cumsum(dim=-1).sub_(top_probs)  # exactly 0 for the top token
    keep = mass_before < limit
    keep[:, 0] = True  # even where top_p is below float32's smallest (0 < 0 is false)
    drop = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top_ids, ~keep)
    spills = keep[:, -1] if k < probs.shape[1] else torch.zeros_like(keep[:, -1])
    return drop, spills


def _select(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Those rows of x: x itself when that is all of them, else a copy."""
    return x if len(rows) == x.shape[0] else x[rows]


def _write_back(x: torch.Tensor, rows: list[int], sub: torch.Tensor) -> None:
    if sub is not x:
        x[rows] = sub


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
    return torch.log_softmax(raw if len(rows) == raw.shape[0] else raw[rows], dim=-1)


def _logprob_results(raw_logprobs: torch.Tensor | None, tokens: torch.Tensor,
                     seqs: list[Sequence], rows: list[int]) -> dict[int, TokenLogprob]:
    """Row index -> the chosen token's raw logprob and its top-N alternatives."""
    if raw_logprobs is None:
        return {}
    entries = token_logprobs(raw_logprobs, tokens[rows],
                             [seqs[i].params.logprobs for i in rows])
    return dict(zip(rows, entries, strict=True))


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                   top_n: list[int]) -> list[TokenLogprob]:
    """Per row of log-probabilities [R, V]: the logprob of that row's token and its
    row's `top_n` most likely alternatives."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    most = max(top_n, default=0)
    if most:
        top_vals, top_ids = (t.tolist() for t in logprobs.topk(most, dim=-1))
    else:
        top_vals = top_ids = [[] for _ in top_n]
    return [TokenLogprob(token_id, chosen[j], dict(zip(top_ids[j][:n], top_vals[j][:n],
                                                        strict=True)))
            for j, (token_id, n) in enumerate(zip(token_ids.tolist(), top_n, strict=True))]
