"""The gateway's tokenizer, chat template, incremental detokenizer and stop strings,
checked against transformers on the default model's tokenizer."""

import random
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from engine.default_model import ensure_default_model
from server.detokenizer import IncrementalDetokenizer, StopChecker
from server.tokenizer import GatewayTokenizer

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "naïve café déjà vu",
         "日本語のテキストと中文", "emoji 🎉🚀 and 👩‍👩‍👧 family", "def f(x):\n    return x ** 2"]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? 🎲"}],
]


@pytest.fixture(scope="module")
def folder():
    return ensure_default_model()


@pytest.fixture(scope="module")
def ours(folder):
    return GatewayTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return AutoTokenizer.from_pretrained(folder)


def test_encode_and_chat_template_match_transformers(ours, hf):
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        assert ours.apply_chat_template(chat) == list(expected)
    assert ours.eos_token_ids and ours.vocab_size == len(hf)
    assert ours.max_context == 8192


def detok_all(ours, ids, prompt=None):
    detok = IncrementalDetokenizer(ours, prompt_ids=prompt)
    pieces = [detok.push(t) for t in ids]
    return pieces, "".join(pieces) + detok.flush()


def test_incremental_detokenization_equals_decoding_the_whole(ours):
    for text in TEXTS:
        ids = ours.encode(text)
        pieces, joined = detok_all(ours, ids, prompt=ours.encode("Prompt:"))
        assert joined == ours.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # never half a character
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert detok_all(ours, ids)[1] == ours.decode(ids)


def test_multibyte_character_split_over_tokens_is_held_back(ours):
    ids = ours.encode("🎉")
    assert len(ids) > 1  # byte-level pieces
    pieces, joined = detok_all(ours, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🎉" == joined


def feed_all(stop, parts):
    checker = StopChecker(stop)
    out, stopped = [], False
    for part in parts:
        text, stopped = checker.feed(part)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(checker.flush())
    return "".join(out), stopped


@pytest.mark.parametrize("stop,parts,expected", [
    (["END"], ["abc E", "N", "D tail"], ("abc ", True)),
    (["abc"], ["a", "b", "a", "b", "c", "x"], ("ab", True)),
    (["stop"], ["stop here"], ("", True)),
    (["xyz", "q"], ["no match at al", "l"], ("no match at all", False)),
    (["\n\n", "###"], ["line\n", "#", "#", "x\n\nmore"], ("line\n##x", True)),
    ([], ["pass", "through"], ("passthrough", False)),
])
def test_stop_strings(stop, parts, expected):
    assert feed_all(stop, parts) == expected


def test_held_back_text_is_released_when_the_stop_does_not_complete():
    checker = StopChecker(["END"])
    assert checker.feed("x E") == ("x ", False)
    assert checker.feed("N") == ("", False)
    assert checker.feed("d") == ("ENd", False)
    checker.feed("E")
    assert checker.flush() == "E"


def test_gateway_text_modules_do_not_import_torch():
    code = ("import server.tokenizer, server.detokenizer, server.app, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
