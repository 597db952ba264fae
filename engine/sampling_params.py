"""Per-request sampling parameters, validated once on construction."""

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.grammar import Grammar
from pdserve_proto.limits import MAX_LOGIT_BIAS, MAX_LOGPROBS


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` means greedy.

    `seed` makes sampling reproducible and independent of the batch: each token is
    drawn from a generator keyed by (seed, sample index, position in the sequence).
    `logprobs` is None (none returned) or the number of top alternatives (0..MAX_LOGPROBS) to
    return beside the chosen token's log-probability. Log-probabilities are taken
    from the model's raw distribution, before penalties and temperature.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    # Logprob of every prompt token after the first, with this many alternatives each
    # (None: none). The prompt is computed in full then, without the prefix cache.
    prompt_logprobs: int | None = None
    # The output must match this grammar (engine.grammar); it ends when the grammar does.
    grammar: Grammar | None = None
    # (token id, bias) pairs added to the logits before any other processing; -100
    # all but bans a token, +100 all but forces it (OpenAI's range).
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # Scheduling order, not sampling: lower runs first (engine.scheduler).
    priority: int = 0

    def __post_init__(self):
        _check(isinstance(self.priority, int) and not isinstance(self.priority, bool),
               "priority", f"must be an integer, got {self.priority!r}")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", f"must be between 0 and max_tokens ({self.max_tokens}), "
               f"got {self.min_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               "temperature", f"must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
               "top_k", f"must be -1 (disabled) or >= 1, got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2,
                   name, f"must be in [-2, 2], got {value!r}")
        _check(isinstance(self.n, int) and 1 <= self.n <= 128,
               "n", f"must be an integer in [1, 128], got {self.n!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               "seed", f"must be an integer, got {self.seed!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
        _check(self.logprobs is None
               or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}], "
               f"got {self.logprobs!r}")
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int)
                   and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}], "
               f"got {self.prompt_logprobs!r}")
        bias = (self.logit_bias.items() if isinstance(self.logit_bias, dict)
                else self.logit_bias)
        pairs = [p for p in bias if isinstance(p, tuple) and len(p) == 2]
        _check(len(pairs) == len(bias) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0
            and _is_number(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in pairs),
               "logit_bias", f"must map token ids to numbers in [-{MAX_LOGIT_BIAS}, "
               f"{MAX_LOGIT_BIAS}], got {self.logit_bias!r}")
        _check(self.grammar is None or isinstance(self.grammar, Grammar),
               "grammar", f"must be an engine.grammar.Grammar, got {self.grammar!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(sorted(dict(pairs).items())))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field_name, message)
