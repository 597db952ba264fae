"""Per-request sampling parameters, validated once on construction."""

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from pdserve_proto.limits import MAX_LOGPROBS


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

    def __post_init__(self):
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
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

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
