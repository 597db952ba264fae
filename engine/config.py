"""The engine's configuration: one dataclass, checked on construction, never mutated.

Each field's default and help text are written here once; the `pdserve` command builds
its engine flags from these fields (`--block-size` from `block_size`), so the flags, the
environment variables (`PDSERVE_BLOCK_SIZE`) and the code can never disagree. Nothing
here imports torch: `pdserve --help` stays fast.
"""

from dataclasses import dataclass

from engine.lora_specs import parse_lora_specs, split_spec
from pdserve_config.fields import flag

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
SPECULATIVE_METHODS = ("ngram", "none")
# CPU flags (/proc/cpuinfo) of bf16 matrix instructions: with one of them `dtype=auto`
# picks bfloat16 on the CPU, without them float32 (oneDNN would emulate bf16, slower).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The KV cache's share of memory when neither kv_cache_tokens nor
# kv_cache_memory_fraction says otherwise: of free GPU memory, or of RAM on the CPU.
DEFAULT_CUDA_KV_FRACTION = 0.9
DEFAULT_CPU_KV_FRACTION = 0.05

_DTYPE_RULE = (f"auto: bfloat16 on CUDA and on CPUs with bf16 matrix instructions "
               f"({' or '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo), else float32")
_QUANTIZATION_RULE = (
    "weight-only quantized linear layers on the CPU: int8 (one scale per row), int4 "
    "(groups of 32 with scale and minimum; a GGUF source's own Q4_0/Q4_1 codes), and "
    "the LM head in int8. auto: a GGUF source (the default model) in its own int4 codes "
    "where pdserve's kernels run fast (x86 with AVX2 or AVX-512, ARM64), in either "
    "dtype; else none")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine process needs to start.

    KV capacity comes from `kv_cache_tokens` when set, else from
    `kv_cache_memory_fraction` of free device memory (CUDA) or of usable RAM (CPU).
    """

    model: str = flag("default", "'default' (SmolLM2-135M-Instruct, bundled), a local "
                       "Hugging Face folder of the Llama family, or random:PRESET (tiny, "
                       "tiny-qwen2, tiny-llama3, smollm2-135m, llama-3.2-1b)")
    dtype: str = flag("auto", _DTYPE_RULE, choices=DTYPES)
    quantization: str = flag("auto", _QUANTIZATION_RULE, choices=QUANTIZATIONS)
    device: str = flag("auto", "auto: cuda when available, else cpu", choices=DEVICES)
    seed: int = flag(0, "seed for random weights and for unseeded sampling")
    block_size: int = flag(16, "tokens per KV block (a power of two)")
    kv_cache_tokens: int | None = flag(
        None, "KV cache capacity in tokens (overrides the memory fraction)")
    kv_cache_memory_fraction: float | None = flag(
        None, f"share of free GPU memory (default {DEFAULT_CUDA_KV_FRACTION}) or of RAM on "
              f"CPU (default {DEFAULT_CPU_KV_FRACTION}; of the container's memory limit "
              f"where that is lower) for the KV cache")
    max_num_seqs: int = flag(64, "most sequences in the running batch")
    max_num_batched_tokens: int = flag(
        512, "token budget of one step; longer prompts are prefilled in chunks")
    max_model_len: int | None = flag(None, "context limit (default: the model's)")
    priority_aging_seconds: float = flag(
        10.0, "a waiting request's priority improves by 1 for every this many seconds it "
              "waits, so a low priority is never starved (0: no aging); the gateway's "
              "admission queue and both workers use it")
    prefix_caching: bool = flag(True, "keep the full KV blocks of finished sequences and "
                                       "reuse them for later prompts with the same prefix")
    num_threads: int | None = flag(None, "CPU threads for torch (default: torch's choice)")
    decode_graphs: bool = flag(True, "CPU without pdserve's kernels: replay decode steps of up "
                                      "to 16 sequences from a graph per batch size, recorded "
                                      "by a decode worker before it serves (the same ops "
                                      "without Python's per-op cost; same output)")
    native_kernels: bool = flag(True, "CPU: decode steps (int4/int8 layers, attention over the "
                                       "paged cache, the layers' small steps) and prompt "
                                       "attention run pdserve's kernels, compiled once with "
                                       "the system C++ compiler over Highway for the CPU's "
                                       "best instruction set (PDSERVE_CPU_TARGET narrows "
                                       "it); off, or where they cannot run: PyTorch's")
    lora: tuple[str, ...] = flag(
        (), "a LoRA adapter to serve, NAME=PATH (a folder PEFT's save_pretrained wrote); "
            "repeat the flag for more, or NAME=PATH,NAME=PATH. A request picks one by "
            "name; a bad folder fails the start", type=parse_lora_specs, repeatable=True)
    max_loras: int = flag(4, "LoRA adapters kept in memory; others are read from their "
                             "folder when a request names them, evicting the least "
                             "recently used one no running request uses")
    speculative: str = flag(
        "none", "speculative decoding on decoding sequences: ngram (prompt lookup: "
                 "propose the tokens that followed the last earlier occurrence of the "
                 "sequence's last tokens, verify them in one step; same output as none) or "
                 "none; draft:MODEL is not supported yet")
    num_speculative_tokens: int = flag(4, "most tokens drafted per sequence and step "
                                          "(--speculative ngram)")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, "
                             f"got {self.quantization!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be >= block_size ({self.block_size}), "
                             f"got {self.kv_cache_tokens}")
        fraction = self.kv_cache_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not self.priority_aging_seconds >= 0:
            raise ValueError(f"priority_aging_seconds must be >= 0, got "
                             f"{self.priority_aging_seconds}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens must be >= block_size, "
                             f"got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        for spec in self.lora:
            split_spec(spec)
        if self.speculative.startswith("draft:"):
            raise ValueError(f"speculative {self.speculative!r}: a draft model is not "
                             f"supported yet; use ngram or none")
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {SPECULATIVE_METHODS} (or "
                             f"draft:MODEL, not supported yet), got {self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, "
                             f"got {self.num_speculative_tokens}")
