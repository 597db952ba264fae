"""IncrementalDetokenizer: the pushed pieces always add up to decoding the whole output
(checked against transformers too) and never show half a character; StopChecker: no
text from a stop string on ever leaks, however the text arrives."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.detokenizer import IncrementalDetokenizer, StopChecker
from server.tokenizer import GatewayTokenizer

TEXTS = ["Hello, world! How are you today?", " The answer is 42.\n\nNext line.",
         "naïve café déjà vu — Ångström, Æsir, Øresund, ß",
         "日本語のテキストと中文，한국어도 있어요",
         "emoji 🎉🚀 and family 👩‍👩‍👧 flag 🏳️‍🌈 skin 👍🏽", "def f(x):\n    return x ** 2\n",
         "mixed: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and \U0001f9ea\U0001f9ec end", "   spaces   everywhere   "]


def run(tok, ids, prompt=None, skip=True):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    pieces = [detok.push(t) for t in ids]
    tail = detok.flush()
    return pieces, "".join(pieces) + tail


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_decodes_incrementally_as_a_whole(ours, hf, text):
    ids = ours.encode(text)
    for prompt in (None, ours.encode("Question: what?\nAnswer:")):
        pieces, joined = run(ours, ids, prompt)
        assert joined == ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert joined == text
        assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_chat_output_with_special_tokens(ours, hf):
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi 👋"}])
    ids = ours.encode("Hello! 😊 Ça va? 你好") + list(ours.eos_token_ids)
    for skip in (True, False):
        joined = run(ours, ids, prompt, skip)[1]
        assert joined == ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert run(ours, ids, prompt, False)[1].endswith("<|im_end|>")


def test_multibyte_character_over_several_tokens_is_held_back(ours):
    for char in ("🎉", "👩‍👩‍👧", "𝔘", "\U0001f9ea"):
        ids = ours.encode(char)
        assert len(ids) > 1  # byte-level pieces of one character
        pieces, joined = run(ours, ids)
        assert "".join(pieces) == char == joined
        assert all("\ufffd" not in p for p in pieces)
    ids = ours.encode("🎉")
    pieces = run(ours, ids)[0]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🎉"


def test_leading_space_of_first_token_comes_out(ours):
    ids = ours.encode(" world")
    detok = IncrementalDetokenizer(ours, prompt_ids=ours.encode("Hello"))
    assert detok.push(ids[0]) == " world" and detok.flush() == ""


def test_prompt_context_keeps_sentencepiece_leading_space(tmp_path):
    # SentencePiece-style decoders drop the space of a text's first word, so decoding the
    # first output token alone would glue it to the prompt; the prompt context keeps it.
    sp = Tokenizer(models.WordLevel({"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2},
                                    unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.save(str(tmp_path / "tokenizer.json"))
    tok = GatewayTokenizer.from_folder(tmp_path)
    assert tok.decode([2]) == "world"
    assert run(tok, [2, 2], prompt=[1])[1] == " world world"


def test_prompt_ids_ending_inside_a_character(ours):
    # A completions prompt may be raw token ids that stop halfway through an emoji; the
    # output's bytes must not complete the prompt's character.
    emoji = ours.encode("x🎉")
    prompt, output = emoji[:-1], emoji[-1:] + ours.encode(" ok é")
    joined = run(ours, output, prompt)[1]
    assert joined == ours.decode(output) and joined.endswith(" ok é")


def test_random_ids_match_whole_decode(ours, hf):
    rng = random.Random(1234)
    # Single-byte tokens combine into valid, partial and invalid UTF-8 sequences, the
    # hardest case for holding back half characters.
    byte_ids = [ours.encode(chr(c))[0] for c in range(33, 127)] + list(range(3, 270))
    for trial in range(200):
        pool = byte_ids if trial % 2 else range(ours.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.choice(pool) for _ in range(rng.randrange(0, 8))]
        skip = trial % 3 != 0
        assert run(ours, ids, prompt, skip)[1] == ours.decode(ids, skip)
    ids = [rng.randrange(ours.vocab_size) for _ in range(60)]
    assert run(ours, ids)[1] == hf.decode(ids, skip_special_tokens=True)


def test_window_stays_short_on_long_outputs(ours):
    ids = ours.encode("A long answer with some words, é and 🎉. " * 150)
    detok = IncrementalDetokenizer(ours, prompt_ids=ours.encode("Go:"))
    widest = 0
    for t in ids:
        detok.push(t)
        widest = max(widest, len(detok.ids) - detok.prefix_offset)
    assert len(ids) > 1000 and widest < 12  # O(1) work per token, not O(n)


def feed_all(stop, parts):
    checker = StopChecker(stop)
    out, stopped = [], False
    for part in parts:
        text, stopped = checker.feed(part)
        out.append(text)
        if stopped:
            assert checker.feed("more") == ("", True) and checker.flush() == ""
            break
    if not stopped:
        out.append(checker.flush())
    return "".join(out), stopped


@pytest.mark.parametrize("stop,parts,expected", [
    (["END"], ["abc E", "N", "D tail"], ("abc ", True)),           # spans three feeds
    (["abc"], ["a", "b", "a", "b", "c", "x"], ("ab", True)),       # overlapping prefix
    (["abc"], ["ababc"], ("ab", True)),
    (["abc"], ["xab", "abc"], ("xab", True)),
    (["stop"], ["stop here"], ("", True)),                         # at the very start
    (["stop"], ["st", "op"], ("", True)),
    (["xyz", "q"], ["no match at al", "l"], ("no match at all", False)),
    (["\n\n", "###"], ["line\n", "#", "#", "x\n\nmore"], ("line\n##x", True)),
    (["world", "lo w"], ["hello", " world"], ("hel", True)),        # earliest stop wins
    (["🎉"], ["party ", "🎉", " after"], ("party ", True)),
    ([], ["pass", "through"], ("passthrough", False)),
    (None, ["a", "b"], ("ab", False)),
    ([""], ["empty", " stop ignored"], ("empty stop ignored", False)),
])
def test_stop_strings(stop, parts, expected):
    assert feed_all(stop, parts) == expected


def test_held_tail_is_released_when_the_stop_does_not_complete():
    checker = StopChecker(["END"])
    assert checker.feed("x E") == ("x ", False)
    assert checker.feed("N") == ("", False)
    assert checker.feed("d") == ("ENd", False)
    assert checker.feed("E") == ("", False)
    assert checker.flush() == "E"


def test_nothing_leaks_for_random_splits():
    rng = random.Random(7)
    stops = ["</s>", "ababc", "\n\nUser:"]
    for _ in range(300):
        body = "".join(rng.choice(["ab", "a", "c", "<", "/s", "\n", "User", ":", " x"])
                       for _ in range(rng.randrange(0, 15)))
        text = body + rng.choice(stops + [""]) + "tail"
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        parts = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)], strict=True)]
        out, stopped = feed_all(stops, parts)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert (out, stopped) == ((text[:min(hits)], True) if hits else (text, False))
