"""PEFT LoRA adapters for tests, made on a Hugging Face model with random non-zero
weights (PEFT's own init leaves B at zero, which would change nothing), and the greedy
output transformers + PEFT give with them: what pdserve must reproduce."""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(hf_model, folder: Path, *, seed: int, rank: int = 8, alpha: int = 16,
                 targets=ALL_TARGETS) -> Path:
    """Save an adapter of `hf_model` with random weights to `folder` (PEFT's
    save_pretrained layout); `hf_model` is left as it was."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        init_lora_weights=False)
    peft_model = get_peft_model(hf_model, config)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # takes the LoRA layers out of hf_model again
    return folder


def greedy_with_adapter(hf_model, folder: Path, prompts: list[list[int]],
                        max_new_tokens: int) -> list[list[int]]:
    """transformers + PEFT generate() under the adapter saved in `folder`, greedy."""
    peft_model = PeftModel.from_pretrained(hf_model, folder)
    try:
        return [_greedy(peft_model, prompt, max_new_tokens) for prompt in prompts]
    finally:
        peft_model.unload()


def _greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
