"""LoRA adapters through `pdserve up` (the 1P1D float32 stack test_gateway.py goes on with,
prompts under 16 tokens prefilled on the decode worker, longer ones remotely), loaded
through the admin endpoint (`--lora` at start: tests/unit/test_lora_folders.py):
the OpenAI client picks an adapter by `model` and gets transformers + PEFT's greedy
output on both paths; /v1/models lists adapters under their base; an adapter loaded at
run time through the admin endpoint serves, then is gone once unloaded (404); a corrupt
folder is a 400 naming the file; a decode worker restarted after the load (kill -9) is
asked to load the adapter when a request names it; every KV block is free afterwards."""

import os
import shutil
import signal

import httpx
import openai
import pytest
import torch

from tests.integration.conftest import LOCAL_PREFILL_MAX
from tests.support.peft_adapters import greedy_with_adapter, make_adapter
from tests.support.stack import Stack, kv_transfer_bytes, metric, pid_listening_on, wait_for

MAX_NEW = 12
SHORT = "The capital of France is"  # colocated
CHAT = "Name three rivers of Europe and say where each one ends."  # templated: remote


@pytest.fixture(scope="module")
def folders(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sql": make_adapter(hf_model, root / "sql", seed=1),
            # Another rank, alpha and target set, loaded at run time.
            "poet": make_adapter(hf_model, root / "poet", seed=2, rank=4, alpha=32,
                                 targets=("q_proj", "v_proj", "down_proj"))}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    short = tokenizer.encode(SHORT)
    assert len(short) < LOCAL_PREFILL_MAX < len(chat)
    return {"short": short, "chat": list(chat)}


@pytest.fixture(scope="module")
def expected(hf_model, folders, prompts, tokenizer) -> dict[str | None, dict[str, str]]:
    """adapter (None: the base model) -> prompt name -> transformers' greedy text."""
    names = list(prompts)
    texts = {}
    for adapter in (None, *folders):
        outputs = (greedy_with_adapter(hf_model, folders[adapter], list(prompts.values()),
                                       MAX_NEW)
                   if adapter else [_greedy(hf_model, p) for p in prompts.values()])
        texts[adapter] = {name: tokenizer.decode(out, skip_special_tokens=True)
                          for name, out in zip(names, outputs, strict=True)}
    return texts


def _greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def stack(gateway_stack, folders):
    """The shared stack with adapter "sql" loaded, unloaded again at the end."""
    admin = httpx.Client(base_url=gateway_stack.url, headers=gateway_stack.headers(),
                         timeout=120)
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "sql",
                                                   "lora_path": str(folders["sql"])})
    assert r.status_code == 200, r.text
    yield gateway_stack
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0)


def answer(client, model: str, prompt: str, *, chat: bool) -> str:
    if chat:
        r = client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": prompt}], max_tokens=MAX_NEW, temperature=0)
        assert r.model == model
        return r.choices[0].message.content
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW,
                                  temperature=0)
    assert r.model == model
    return r.choices[0].text


def test_the_openai_client_selects_an_adapter_by_model_colocated_and_1p1d(
        stack, client, expected):
    base = client.models.list().data[0].id
    moved = kv_transfer_bytes(stack.url)
    assert answer(client, "sql", SHORT, chat=False) == expected["sql"]["short"]
    assert kv_transfer_bytes(stack.url) == moved  # colocated: no KV crossed
    assert answer(client, "sql", CHAT, chat=True) == expected["sql"]["chat"]
    assert kv_transfer_bytes(stack.url) > moved  # 1P1D
    # The adapter's KV is cached under its own namespace: the same prompts again under
    # the adapter, then under the base model, each get their own model's tokens.
    assert answer(client, "sql", CHAT, chat=True) == expected["sql"]["chat"]
    assert answer(client, base, CHAT, chat=True) == expected[None]["chat"]
    assert answer(client, base, SHORT, chat=False) == expected[None]["short"]
    assert expected["sql"] != expected[None]  # the adapter changes the output
    assert_every_block_free(stack)


def test_models_lists_adapters_under_their_base_and_an_unknown_model_is_a_404(
        stack, client, folders):
    models = {m.id: m for m in client.models.list().data}
    base = next(m for m in models.values() if m.parent is None)
    assert models["sql"].parent == base.id and models["sql"].object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        answer(client, "no-such-adapter", SHORT, chat=False)
    error = caught.value.body
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "'no-such-adapter' does not exist" in error["message"] and "'sql'" in error["message"]
    reports = [stack.health(name) for name in stack.workers]
    listed = [{a.name: a.digest for a in health.loras} for health in reports]
    assert listed[0].keys() == {"sql"} and listed[0] == listed[1]  # both roles, same files


def test_an_adapter_loaded_at_run_time_serves_until_unloaded(stack, client, folders, expected,
                                                             tmp_path):
    admin = httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=120)
    body = {"lora_name": "poet", "lora_path": str(folders["poet"])}
    assert httpx.post(f"{stack.url}/v1/load_lora_adapter", json=body).status_code == 401
    r = admin.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200 and "poet" in r.text, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["poet"].root == str(folders["poet"])
    assert answer(client, "poet", CHAT, chat=True) == expected["poet"]["chat"]
    assert answer(client, "poet", SHORT, chat=False) == expected["poet"]["short"]

    r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "poet"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        answer(client, "poet", SHORT, chat=False)
    r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "poet"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    assert "poet" not in {m.id for m in client.models.list().data}

    corrupt = shutil.copytree(folders["poet"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "bad",
                                                   "lora_path": str(corrupt)})
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    assert "bad" not in {m.id for m in client.models.list().data}
    assert_every_block_free(stack)


def test_a_restarted_worker_is_asked_to_load_the_adapter_a_request_names(stack, client,
                                                                          expected):
    # "sql" came through the admin endpoint: a worker restarted since has lost it.
    address = stack.workers["decode-1"]
    restarts = metric(stack.url, "pdserve_worker_restarts_total", worker=address)
    os.kill(pid_listening_on(address), signal.SIGKILL)
    wait_for(lambda: metric(stack.url, "pdserve_worker_restarts_total", worker=address)
             > restarts, 120, "the restart")
    wait_for(lambda: metric(stack.url, "pdserve_worker_up", worker=address) == 1, 60, "rejoin")
    assert "sql" not in {a.name for a in stack.health("decode-1").loras}
    # The request waits for the load on the one decode worker, then gets its text.
    assert answer(client, "sql", SHORT, chat=False) == expected["sql"]["short"]
    assert "sql" in {a.name for a in stack.health("decode-1").loras}
    assert_every_block_free(stack)


def assert_every_block_free(stack: Stack) -> None:
    for name, health in stack.wait_idle().items():
        assert health.free_kv_blocks == health.total_kv_blocks, name
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), name
