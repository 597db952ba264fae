"""The sampler on hand-made logits: exact picks, exact logprobs, seeded reproducibility."""

import math

import pytest
import torch

from engine.sampler import SampledToken, Sampler, _apply_top_k, _apply_top_p, noise_key
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

EOS = 0
NEG = -10.0  # background logit, far below every token a test cares about


def make_seq(prompt=(20, 21, 22), output=(), sample_index=0, **params) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(**params), sample_index=sample_index)
    seq.output_token_ids = list(output)
    return seq


def row(vocab: int = 32, **values: float) -> torch.Tensor:
    """A logits row at NEG except the given tokens: row(t5=2.0, t6=1.5)."""
    logits = torch.full((vocab,), NEG)
    for name, value in values.items():
        logits[int(name[1:])] = value
    return logits


def sample(logits_rows, seqs, sampler: Sampler | None = None) -> list[SampledToken]:
    sampler = sampler or Sampler((EOS,), seed=0)
    return sampler(torch.stack(list(logits_rows)), seqs)


def pick(logits: torch.Tensor, seq: Sequence) -> int:
    return sample([logits], [seq])[0].token_id


def probs_of(logits: list[float]) -> list[float]:
    return torch.tensor(logits).softmax(-1).tolist()


# ----- greedy and input handling -------------------------------------------------------


def test_greedy_picks_each_rows_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 32, generator=gen)
    seqs = [make_seq(temperature=0) for _ in range(5)]
    out = Sampler((EOS,))(logits, seqs)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert all(t.logprob is None for t in out)


def test_processing_never_writes_the_callers_logits():
    logits = torch.stack([row(t5=2.0, t6=1.5), row(t0=3.0, t7=1.0)])
    before = logits.clone()
    seqs = [make_seq(output=[5, 5], temperature=0, repetition_penalty=2.0,
                     frequency_penalty=1.0),
            make_seq(temperature=0.7, min_tokens=3)]
    Sampler((EOS,))(logits, seqs)
    assert torch.equal(logits, before)


def test_rejects_logits_that_do_not_match_the_batch():
    with pytest.raises(ValueError, match="expected logits"):
        Sampler((EOS,))(torch.zeros(2, 8), [make_seq(temperature=0)])


def test_empty_batch_gives_no_tokens():
    assert Sampler((EOS,))(torch.zeros(0, 8), []) == []


def test_a_tiny_temperature_samples_like_greedy_without_nans():
    logits = torch.randn(32, 16, generator=torch.Generator().manual_seed(14))
    seqs = [make_seq(temperature=1e-30, seed=s) for s in range(32)]
    assert [t.token_id for t in Sampler((EOS,))(logits, seqs)] == logits.argmax(-1).tolist()


# ----- penalties -----------------------------------------------------------------------


@pytest.mark.parametrize("unseen, expected", [(0.99, 5), (1.01, 6)])
def test_repetition_penalty_divides_positive_logits_of_prompt_tokens(unseen, expected):
    # 5 is in the prompt: 2.0 / 2 = 1.0 must land between 0.99 and 1.01.
    seq = make_seq(prompt=[5, 9], temperature=0, repetition_penalty=2.0)
    assert pick(row(t5=2.0, t6=unseen), seq) == expected
    assert pick(row(t5=2.0, t6=unseen), make_seq(prompt=[5, 9], temperature=0)) == 5


@pytest.mark.parametrize("unseen, expected", [(-2.01, 5), (-1.99, 6)])
def test_repetition_penalty_multiplies_negative_logits_of_output_tokens(unseen, expected):
    # 5 was generated: -1.0 * 2 = -2.0 must land between -2.01 and -1.99.
    seq = make_seq(prompt=[9], output=[5], temperature=0, repetition_penalty=2.0)
    assert pick(row(vocab=32, t5=-1.0, t6=unseen), seq) == expected


@pytest.mark.parametrize("other, expected", [(0.49, 5), (0.51, 6)])
def test_presence_penalty_subtracts_once_for_any_output_count(other, expected):
    # 5 generated three times: 1.0 - 0.5 = 0.5, whatever the count.
    seq = make_seq(output=[5, 5, 5], temperature=0, presence_penalty=0.5)
    assert pick(row(t5=1.0, t6=other), seq) == expected


@pytest.mark.parametrize("other, expected", [(0.39, 5), (0.41, 6)])
def test_frequency_penalty_subtracts_per_occurrence(other, expected):
    # 5 generated three times: 1.0 - 3 * 0.2 = 0.4.
    seq = make_seq(output=[5, 7, 5, 5], temperature=0, frequency_penalty=0.2)
    assert pick(row(t5=1.0, t6=other), seq) == expected


@pytest.mark.parametrize("other, expected", [(0.14, 5), (0.16, 6)])
def test_all_penalties_combine_in_order(other, expected):
    # Repetition first: 2.0 / 1.25 = 1.6; then 1.6 - (0.25 + 2 * 0.6) = 0.15.
    seq = make_seq(output=[5, 5], temperature=0, repetition_penalty=1.25,
                   presence_penalty=0.25, frequency_penalty=0.6)
    assert pick(row(t5=2.0, t6=other), seq) == expected


class OnlyAllowed:
    """A grammar's matcher that allows these tokens and no others."""

    def __init__(self, *ids: int, vocab: int = 32):
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[list(ids)] = True

    def allowed(self) -> torch.Tensor:
        return self.mask


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=1),
                                      dict(temperature=1.0),
                                      dict(temperature=0.7, top_p=0.9, min_p=0.1, seed=2),
                                      dict(temperature=1.5, top_k=3, seed=3)])
def test_extreme_repetition_penalties_keep_the_draw_among_allowed_tokens(sampling):
    # 1e-301 is 0 in float32: seen logits divided by it were inf, a seen token masked
    # by the grammar (-inf) times it NaN, softmax of the row NaN, and the draw fell on
    # token 0 whatever the grammar allowed.
    logits = row(t5=2.0, t6=1.5, t7=-1.0, t9=3.0)
    tiny = make_seq(prompt=(5, 6, 7), repetition_penalty=1e-301, **sampling)
    assert pick(logits, tiny) in (5, 6)
    tiny.matcher = OnlyAllowed(6, 7, 9)
    assert pick(logits, tiny) == 6
    huge = make_seq(prompt=(5, 6, 7), repetition_penalty=1e301, **sampling)
    assert pick(logits, huge) in (5, 6, 9)  # 7 is at -1e20
    huge.matcher = OnlyAllowed(5, 7)
    assert pick(logits, huge) == 5


def test_presence_and_frequency_ignore_prompt_tokens():
    seq = make_seq(prompt=[5, 5, 5], output=[9], temperature=0,
                   presence_penalty=2.0, frequency_penalty=2.0)
    assert pick(row(t5=1.0, t6=0.9), seq) == 5


# ----- min_tokens ----------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = row(t0=3.0, t4=2.0, t7=1.0)  # EOS 0, stop id 4, ordinary 7
    params = dict(temperature=0, min_tokens=2, stop_token_ids=(4,))
    assert pick(logits, make_seq(output=[], **params)) == 7
    assert pick(logits, make_seq(output=[9], **params)) == 7
    assert pick(logits, make_seq(output=[9, 9], **params)) == EOS


def test_min_tokens_blocks_every_configured_eos():
    sampler = Sampler((0, 3), seed=0)
    logits = row(t0=3.0, t3=2.5, t7=1.0)
    assert sample([logits], [make_seq(temperature=0, min_tokens=1)], sampler)[0].token_id == 7


def test_min_tokens_with_ignore_eos_still_blocks_stop_ids_but_not_eos():
    logits = row(t0=3.0, t4=4.0, t7=1.0)
    seq = make_seq(temperature=0, min_tokens=1, stop_token_ids=(4,), ignore_eos=True)
    assert pick(logits, seq) == EOS


def test_min_tokens_blocks_stop_ids_when_sampling():
    logits = row(t0=5.0, t4=5.0, t7=0.0)  # EOS and the stop id hold ~99% of the mass
    seqs = [make_seq(temperature=1.0, min_tokens=1, stop_token_ids=(4,), seed=s)
            for s in range(50)]
    tokens = {t.token_id for t in sample([logits] * 50, seqs)}
    assert EOS not in tokens and 4 not in tokens


# ----- top-k, top-p, min-p -------------------------------------------------------------


def test_top_k_one_equals_greedy_at_temperature_one():
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    seqs = [make_seq(temperature=1.0, top_k=1) for _ in range(64)]
    assert [t.token_id for t in Sampler((EOS,))(logits, seqs)] == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 2.5, -1.0]]).repeat(400, 1)
    seqs = [make_seq(temperature=1.0, top_k=2, seed=s) for s in range(400)]
    assert {t.token_id for t in Sampler((EOS,))(logits, seqs)} == {3, 4}


@pytest.mark.parametrize("top_p", [0.01, 1e-300])
def test_small_top_p_keeps_only_the_top_token(top_p):
    # 1e-300 is 0 in float32: no token's mass was below it, all were dropped, and the
    # draw fell on token 0 whatever the grammar allowed.
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    seqs = [make_seq(temperature=1.0, top_p=top_p) for _ in range(64)]
    assert [t.token_id for t in Sampler((EOS,))(logits, seqs)] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_p, kept", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(1000, 1)
    seqs = [make_seq(temperature=1.0, top_p=top_p) for _ in range(1000)]
    assert {t.token_id for t in Sampler((EOS,), seed=4)(logits, seqs)} == kept


def reference_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Full-sort nucleus mask (True = dropped), the textbook way."""
    probs = x.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    dropped_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(dropped_sorted).scatter(0, order, dropped_sorted)


def test_top_p_matches_a_full_sort_for_small_medium_and_huge_nuclei():
    # Peaky, flatter and flat rows: nuclei inside the first 256 candidates, inside
    # 4096, and past both, so every widening step is exercised.
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 8192, generator=gen) * torch.tensor([[4.0], [2.0], [0.2], [3.0]])
    top_p = [0.9, 0.9, 0.9, 1.0]
    expected = [reference_top_p(x[j], p) for j, p in enumerate(top_p[:3])]
    kept = [int((~e).sum()) for e in expected]
    assert kept[0] <= 256 < kept[1] <= 4096 < kept[2]
    # top_p = 1 keeps everything, though a float32 cumsum reaches 1.0 before the tail.
    expected.append(torch.zeros(8192, dtype=torch.bool))
    out = x.clone()
    _apply_top_p(out, top_p)
    for j in range(4):
        assert torch.equal(out[j].isinf(), expected[j])
        assert torch.equal(out[j][~expected[j]], x[j][~expected[j]])


def test_top_k_leaves_rows_without_top_k_alone():
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    _apply_top_k(x, [2, -1, 3])
    inf = float("-inf")
    assert x.tolist() == [[inf, 3.0, inf, 2.0], [0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, inf]]


def test_min_p_never_picks_a_token_below_the_threshold():
    # Threshold 0.2 * 0.5 = 0.1: 0.15 stays, 0.05 goes.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(1000, 1)
    seqs = [make_seq(temperature=1.0, min_p=0.2, seed=s) for s in range(1000)]
    assert {t.token_id for t in Sampler((EOS,))(logits, seqs)} == {0, 1, 2}
    plain = [make_seq(temperature=1.0, seed=s) for s in range(1000)]
    assert 3 in {t.token_id for t in Sampler((EOS,))(logits, plain)}


# ----- seeded determinism and batch independence ---------------------------------------


def test_noise_key_is_a_63_bit_function_of_all_three_ints():
    keys = {noise_key(7, 0, 10), noise_key(7, 0, 11), noise_key(7, 1, 10), noise_key(8, 0, 10)}
    assert len(keys) == 4
    assert noise_key(7, 0, 10) == noise_key(7, 0, 10)
    assert all(0 <= k < 1 << 63 for k in keys | {noise_key(-5, 0, 0), noise_key(1 << 80, 3, 9)})


def test_same_seed_sample_and_position_give_the_same_token():
    logits = torch.zeros(1, 32)  # uniform: the token is decided by the noise alone
    for prompt_len in range(1, 30):
        a = make_seq(prompt=[1] * prompt_len, temperature=1.0, seed=42)
        b = make_seq(prompt=[2] * (prompt_len - 1), output=[3], temperature=1.0, seed=42)
        first = Sampler((EOS,), seed=0)(logits, [a])[0].token_id
        second = Sampler((EOS,), seed=99)(logits, [b])[0].token_id
        assert first == second


def test_position_sample_index_and_seed_each_change_the_noise():
    logits = torch.zeros(1, 32)

    def token(prompt_len=5, sample_index=0, seed=42):
        seq = make_seq(prompt=[1] * prompt_len, sample_index=sample_index, temperature=1.0,
                       seed=seed)
        return Sampler((EOS,))(logits, [seq])[0].token_id

    assert len({token(prompt_len=n) for n in range(1, 21)}) > 5
    assert len({token(sample_index=i) for i in range(20)}) > 5
    assert len({token(seed=s) for s in range(20)}) > 5


def neighbours(vocab: int) -> tuple[list[torch.Tensor], list[Sequence]]:
    gen = torch.Generator().manual_seed(5)
    logits = [torch.randn(vocab, generator=gen) for _ in range(6)]
    seqs = [make_seq(temperature=0),
            make_seq(temperature=0.8, top_k=5, top_p=0.9),
            make_seq(temperature=1.3, seed=1, output=[4, 4], frequency_penalty=0.5),
            make_seq(temperature=0, repetition_penalty=1.5, logprobs=3),
            make_seq(temperature=0.5, min_p=0.1, min_tokens=4, logprobs=0),
            make_seq(temperature=1.0, seed=42, sample_index=1)]
    return logits, seqs


@pytest.mark.parametrize("target", [
    dict(temperature=1.0, seed=42),
    dict(temperature=0.7, top_p=0.8, top_k=10, seed=7, logprobs=2),
    dict(temperature=1.0, min_p=0.05, seed=123, repetition_penalty=1.3),
    dict(temperature=0, presence_penalty=1.0),
])
def test_a_seeded_or_greedy_row_is_the_same_alone_or_in_any_batch(target):
    vocab = 32
    gen = torch.Generator().manual_seed(6)
    others, other_seqs = neighbours(vocab)
    for position in range(3, 13):
        logits = torch.randn(vocab, generator=gen)
        seq = make_seq(prompt=[1] * position, output=[2], **target)
        alone = sample([logits], [seq], Sampler((EOS,), seed=0))[0]
        for where in (0, 3, 6):
            rows = others[:where] + [logits] + others[where:]
            seqs = other_seqs[:where] + [seq] + other_seqs[where:]
            in_batch = sample(rows, seqs, Sampler((EOS,), seed=where + 1))[where]
            assert in_batch == alone


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(20, 32)
    seqs = [make_seq(temperature=1.0) for _ in range(20)]

    def tokens(seed):
        return [t.token_id for t in Sampler((EOS,), seed=seed)(logits, seqs)]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


# ----- logprobs ------------------------------------------------------------------------


def test_logprobs_report_the_chosen_token_and_top_n_from_raw_logits():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(8))
    seqs = [make_seq(temperature=1.0, logprobs=3, seed=1),
            make_seq(temperature=0, logprobs=5),
            make_seq(temperature=0, logprobs=0)]
    out = Sampler((EOS,))(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    for i, (token, n) in enumerate(zip(out, [3, 5, 0], strict=True)):
        assert token.logprob.token_id == token.token_id
        assert token.logprob.logprob == pytest.approx(raw[i, token.token_id].item(), abs=1e-6)
        values, ids = raw[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=int))
        assert len(token.logprob.top) == n
        assert list(token.logprob.top) == ids.tolist()
        assert list(token.logprob.top.values()) == pytest.approx(values.tolist(), abs=1e-6)


def test_logprobs_ignore_penalties_temperature_and_min_tokens():
    logits = row(vocab=24, t0=3.0, t5=2.0, t6=1.0)
    raw = torch.log_softmax(logits, dim=-1)
    seq = make_seq(output=[5], temperature=0.3, repetition_penalty=1.8,
                   frequency_penalty=1.5, min_tokens=2, logprobs=2, seed=3)
    out = sample([logits], [seq])[0]
    assert out.token_id == 6  # EOS blocked, 5 penalised below 6
    assert out.logprob.logprob == pytest.approx(raw[6].item(), abs=1e-6)
    assert out.logprob.top == pytest.approx({0: raw[0].item(), 5: raw[5].item()}, abs=1e-6)


def test_rows_without_logprobs_get_none_beside_rows_with_them():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(9))
    out = Sampler((EOS,))(logits, [make_seq(temperature=0), make_seq(temperature=0, logprobs=1)])
    assert out[0].logprob is None and out[1].logprob is not None


# ----- the distribution ----------------------------------------------------------------


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab)
    return (counts.float() / len(tokens)).tolist()


def test_unseeded_draws_match_softmax():
    logits = [1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -20.0]
    seqs = [make_seq(temperature=1.0) for _ in range(100)]
    sampler = Sampler((EOS,), seed=11)
    tokens = []
    for _ in range(40):
        tokens += [t.token_id for t in sampler(torch.tensor([logits] * 100), seqs)]
    assert frequencies(tokens, 8) == pytest.approx(probs_of(logits), abs=0.02)


def test_seeded_draws_match_softmax_at_temperature_two():
    logits = [1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -20.0]
    seqs = [make_seq(prompt=[1] * (1 + i % 50), sample_index=i // 50, temperature=2.0,
                     seed=5) for i in range(4000)]
    tokens = [t.token_id for t in sample([torch.tensor(logits)] * 4000, seqs)]
    tempered = probs_of([x / 2 for x in logits])
    assert frequencies(tokens, 8) == pytest.approx(tempered, abs=0.02)


# ----- dtypes and devices --------------------------------------------------------------


def test_bfloat16_logits_match_their_float32_values():
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(10)).bfloat16()
    seqs = [make_seq(temperature=0),
            make_seq(temperature=0.9, seed=4, logprobs=2),
            make_seq(temperature=0, repetition_penalty=1.2, logprobs=1),
            make_seq(temperature=1.0, top_k=4, seed=8)]
    out_bf16 = Sampler((EOS,))(logits, seqs)
    out_f32 = Sampler((EOS,))(logits.float(), seqs)
    assert out_bf16 == out_f32
    assert out_bf16[0].token_id == logits[0].float().argmax().item()
    assert isinstance(out_bf16[1].logprob.logprob, float)
    assert math.isfinite(out_bf16[1].logprob.logprob)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_tokens_are_the_same_on_cuda_and_cpu():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(12))
    seqs = [make_seq(prompt=[1] * (i + 1), temperature=1.0, top_p=0.9, seed=i, logprobs=2)
            for i in range(6)]
    on_cpu = Sampler((EOS,))(logits, seqs)
    on_cuda = Sampler((EOS,))(logits.cuda(), seqs)
    assert [t.token_id for t in on_cuda] == [t.token_id for t in on_cpu]


def test_logit_bias_is_added_before_greedy_and_sampling():
    logits = row(t5=2.0, t6=1.5, t9=0.5)
    assert pick(logits, make_seq(temperature=0)) == 5
    assert pick(logits, make_seq(temperature=0, logit_bias={5: -100})) == 6
    assert pick(logits, make_seq(temperature=0, logit_bias={9: 1.6})) == 9  # 0.5 + 1.6
    # Sampling sees the biased logits: a token pushed to -100 is never drawn.
    draws = {pick(logits, make_seq(temperature=1.0, seed=s, logit_bias={5: -100, 6: -100}))
             for s in range(40)}
    assert draws == {9}
    # Ids past the vocabulary are ignored; the raw logprobs ignore the bias.
    out = sample([logits], [make_seq(temperature=0, logprobs=0, logit_bias={5: -100, 99: 5})])
    assert out[0].token_id == 6
    assert out[0].logprob.logprob == pytest.approx(
        torch.log_softmax(logits, -1)[6].item())


@pytest.mark.parametrize("bias, field", [({1: 101}, "logit_bias"), ({-1: 1}, "logit_bias"),
                                          ({1: float("nan")}, "logit_bias")])
def test_bad_logit_bias_names_the_field(bias, field):
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(logit_bias=bias)
