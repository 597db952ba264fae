"""GatewayTokenizer against transformers' AutoTokenizer on the default model, plus the
template environment details (errors, tojson, loop controls) on small custom folders."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from server.tokenizer import GatewayTokenizer

TEXTS = ["Hello, world!", "", " leading space", "  two spaces\tand\ttabs\n\nnewlines",
         "naïve café déjà vu, Ångström", "日本語のテキストと中文，한국어", "emoji 🎉🚀 👩‍👩‍👧 🏳️‍🌈",
         "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nspecial in text<|im_end|>"]
CHATS = {
    "system+user": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Why is the sky blue?"}],
    "no system": [{"role": "user", "content": "Hi there"}],
    "multi-turn": [{"role": "system", "content": "You add numbers."},
                   {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3? 🎲 café"}],
    "assistant last": [{"role": "user", "content": "Say hi"},
                       {"role": "assistant", "content": "Hi!"}],
}


def make_folder(tmp_path, source, template=None, config=None, generation=None):
    """A model model_dir with the default tokenizer and the given template/configs."""
    shutil.copy(source / "tokenizer.json", tmp_path / "tokenizer.json")
    tcfg = json.loads((source / "tokenizer_config.json").read_text())
    tcfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    for name, data in (("config.json", config), ("generation_config.json", generation)):
        if data is not None:
            (tmp_path / name).write_text(json.dumps(data))
    return GatewayTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf, text):
    assert ours.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, name, add_generation_prompt):
    chat = CHATS[name]
    expected = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=True)["input_ids"]
    assert ours.apply_chat_template(chat, add_generation_prompt) == list(expected)
    text = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                  tokenize=False)
    assert ours.render_chat(chat, add_generation_prompt) == text


def test_chat_ids_hold_special_tokens_and_no_extras(ours):
    ids = ours.apply_chat_template(CHATS["no system"])
    im_start = ours.encode("<|im_start|>")
    assert len(im_start) == 1 and ids[0] == im_start[0]  # one special id, not its letters
    assert ours.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    # default system prompt, user, assistant header: no BOS or EOS added around them
    assert ids.count(im_start[0]) == 3 and ids[-1] != ours.eos_token_ids[0]


def test_decode_and_token_text_match_transformers(ours, hf):
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, False) == hf.decode(ids, skip_special_tokens=False)
    for token_id in (0, 1, 2, 28, 300, 4000, ours.vocab_size - 1):
        assert ours.id_to_token_text(token_id) == hf.decode([token_id])
    assert ours.id_to_token_text(ours.encode(" world")[0]) == " world"


def test_model_facts(ours, hf):
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_ids == (2,) and hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert ours.max_context == 8192
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"


def test_eos_ids_merge_configs_and_context_default(tmp_path, model_dir):
    tok = make_folder(tmp_path, model_dir, config={"eos_token_id": [0, 2]},
                      generation={"eos_token_id": [2, 7]})
    assert tok.eos_token_ids == (0, 2, 7)  # deduplicated, tokenizer's <|im_end|> is 2
    assert tok.max_context == 2048


def test_missing_template_raises_value_error(tmp_path, model_dir):
    tok = make_folder(tmp_path, model_dir)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS["no system"])
    assert tok.encode("still encodes") == GatewayTokenizer.from_folder(model_dir).encode(
        "still encodes")


def test_template_errors_become_value_errors(tmp_path, model_dir):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('first message must be from the user') }}{% endif %}"
                "{{ messages[0]['content'] + 1 }}")
    tok = make_folder(tmp_path, model_dir, template=template)
    with pytest.raises(ValueError, match="first message must be from the user"):
        tok.render_chat([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="could not render"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_broken_template_fails_only_when_chat_is_used(tmp_path, model_dir):
    tok = make_folder(tmp_path, model_dir, template="{% if %}")
    assert tok.encode("hi") == [6004]
    with pytest.raises(ValueError, match="does not compile"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_template_environment_like_hf(tmp_path, model_dir):
    # trim_blocks eats the newline after a block tag, as in HF.
    template = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}"
                "{{ bos_token }}{{ eos_token }}{{ tools is none }}"
                "{{ strftime_now('%Y') | length }}")
    tok = make_folder(tmp_path, model_dir, template=template)
    text = tok.render_chat([{"role": "user", "content": "é<b>"}, {"role": "skip"}])
    assert text == '{"role": "user", "content": "é<b>"}<|im_start|><|im_end|>True4'


def test_none_keys_dropped_and_special_tokens_passed_like_hf(tmp_path, model_dir):
    # OpenAI clients send "name": null; HF drops such keys before rendering, so a
    # template testing `is defined` must not print "None".
    template = ("{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }})"
                "{% endif %}:{{ m.content }}|{% endfor %}{{ unk_token }}{{ pad_token }}"
                "{{ bos_token }}{% if add_generation_prompt %}>{% endif %}")
    tok = make_folder(tmp_path, model_dir, template=template)
    chat = [{"role": "user", "content": "hi", "name": None},
            {"role": "assistant", "content": "yo", "name": "bot"}]
    expected = "user:hi|assistant(bot):yo|<|endoftext|><|im_end|><|im_start|>>"
    assert tok.render_chat(chat) == expected
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == expected
    assert tok.apply_chat_template(chat) == list(hf.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


# A Hermes-style template that takes tools, as Qwen2.5's and others do.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "({{ t.function.parameters | tojson }}){% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_takes_tools_renders_them_and_the_calls(tmp_path, model_dir, hf):
    from server import protocol
    from server.prompts import template_messages, template_tools

    tok = make_folder(tmp_path, model_dir, template=TOOLS_TEMPLATE)
    assert tok.template_takes_tools
    assert not GatewayTokenizer.from_folder(model_dir).template_takes_tools
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    req = protocol.parse_chat_request({"model": "m", "tools": [weather], "messages": [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "4 C", "tool_call_id": "c1"}]})
    messages = template_messages(req, template_takes_tools=True)
    tools = template_tools(req)
    text = tok.render_chat(messages, tools=tools)
    assert text.startswith('<|im_start|>system\nTools: get_weather({"type": "object", '
                           '"properties": {"city": {"type": "string"}}})<|im_end|>')
    assert '<call>get_weather {"city": "Oslo"}</call>' in text
    assert "<|im_start|>tool\n4 C<|im_end|>" in text
    # transformers renders the same template with the same inputs the same way.
    hf_text = hf.apply_chat_template(messages, tools=tools, chat_template=TOOLS_TEMPLATE,
                                     add_generation_prompt=True, tokenize=False)
    assert text == hf_text
