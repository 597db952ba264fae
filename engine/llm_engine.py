"""The engine: requests in, tokens out, one `step()` at a time.

A step is schedule -> run -> sample -> finish. The engine is synchronous and not
thread-safe; a worker process owns one and drives it from a single thread.

Disaggregation hooks:
- export: a sequence added with `export_kv=True` hands each layer's K/V to
  `engine.kv_export(seq, layer, first_position, k, v)` as soon as that layer finishes,
  so a sender can stream it while later layers compute; `prefill_only=True` finishes
  it once its first token is sampled.
- import: `reserve()` holds blocks for a prompt whose KV another process computes,
  `write_imported_kv()` fills them layer by layer, and `commit_imported()` joins the
  sequence to the running batch with the first token sampled elsewhere.

Prefix caching (engine.block_manager): a sequence starts from the longest prefix of its
tokens whose full KV blocks an earlier sequence left, here or imported; a reservation
holds such a prefix too, and only the positions after it are imported.
"""

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.grammar import GrammarTokenizer, compiled
from engine.kv_cache import contiguous_slots, slots_for_positions
from engine.loader import ModelFiles, resolve_model, tokenizer_folder
from engine.lora import LoraRegistry, split_spec
from engine.model_runner import ModelRunner, sampling_order
from engine.sampler import SampledToken, Sampler, plain_argmax
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from engine.speculative import Drafter
from pdserve_proto import prefix

log = logging.getLogger("pdserve.engine")

KVExport = Callable[[Sequence, int, int, torch.Tensor, torch.Tensor], None]


class NoCapacityError(RuntimeError):
    """Not enough free KV blocks to reserve for an imported prompt right now."""


@dataclass
class StepOutput:
    """One new token of one sample, or its end (token_id None when aborted/failed)."""

    request_id: str
    sample_index: int
    token_id: int | None
    logprob: TokenLogprob | None
    finish_reason: FinishReason | None
    seq: Sequence
    # Where token_id stands among the sample's output tokens (for an end without a token:
    # how many it has). Fixed when the output is made: the sequence itself may have grown
    # by the time a consumer on another task reads this output from a queue.
    index: int
    # With the first token when asked for (params.prompt_logprobs): the logprob of each
    # prompt token given the ones before it, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLMEngine:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None):
        self.config = config
        self.files = files or resolve_model(config.model)
        self.model_config = self.files.config
        self.max_model_len = min(config.max_model_len or 1 << 62,
                                 self.model_config.max_position_embeddings)
        self.runner = ModelRunner(config, self.files, self.max_model_len)
        self.lora_registry = LoraRegistry(self.model_config, self.runner.dtype,
                                          self.runner.device, config.max_loras)
        self.runner.adapters = self.lora_registry.resident
        for spec in config.lora:  # a bad folder fails the start, naming the file
            self.lora_registry.register(*split_spec(spec), in_use=frozenset())
        self.cache_namespace = prefix.namespace(
            self.runner.weights_digest, str(self.runner.dtype).removeprefix("torch."),
            self.runner.quantization, config.block_size)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size,
                                   self.cache_namespace if config.prefix_caching else None)
        # A sequence never outgrows what fits alone in the cache, so it can always run.
        self.max_seq_len = min(self.max_model_len, self.blocks.capacity_tokens)
        self.drafter = (Drafter(config.num_speculative_tokens, self.max_seq_len)
                        if config.speculative == "ngram" else None)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   config.priority_aging_seconds, drafter=self.drafter)
        self.sampler = Sampler(self.model_config.eos_token_ids, seed=config.seed)
        self.requests: dict[str, list[Sequence]] = {}
        self.kv_export: KVExport | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._ids = itertools.count()
        self._ended_on_arrival: list[StepOutput] = []  # resumed requests already complete

    # ----- requests -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, *, export_kv: bool = False,
                    prefill_only: bool = False,
                    resume_token_ids: list[int] = (),
                    lora: str | None = None) -> list[Sequence]:
        """Queue a request; one sequence per sample (`params.n`), under the LoRA adapter
        named `lora` (None: the base model). `resume_token_ids`:
        the output a failed worker had generated; the sequence starts as if it had been
        preempted after them (their KV is recomputed, then it samples the next token).
        When those tokens already end it (the worker failed between its last token and
        its finish), it finishes at the next step without computing anything: the
        finish rule is this engine's alone, the gateway never guesses it."""
        if resume_token_ids:
            self._check_resume(prompt_token_ids, params, resume_token_ids)
        seqs = self._new_sequences(request_id, prompt_token_ids, params, lora)
        for seq in seqs:
            seq.export_kv, seq.prefill_only = export_kv, prefill_only
            if resume_token_ids:
                seq.output_token_ids = list(resume_token_ids)
                last = resume_token_ids[-1]
                reason = self._has_matcher(seq) and self._finish_reason(seq, last)
                if reason:
                    self._finish(seq, reason)
                    self._ended_on_arrival.append(StepOutput(
                        request_id, seq.sample_index, None, None, reason, seq,
                        seq.num_output_tokens))
                    continue
            self.scheduler.add(seq)
        return seqs

    def abort_request(self, request_id: str,
                      reason: FinishReason = FinishReason.ABORT) -> list[StepOutput]:
        """Cancel a request in any state and free its blocks at once (`reason` ERROR:
        it failed rather than being cancelled)."""
        outputs = []
        for seq in list(self.requests.get(request_id, ())):
            if not seq.is_finished:
                self._finish(seq, reason)
                outputs.append(StepOutput(request_id, seq.sample_index, None, None,
                                          reason, seq, seq.num_output_tokens))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work or bool(self._ended_on_arrival)

    def record_decode_graphs(self) -> list[int]:
        """Record the decode graph of every batch size now (engine.decode_graph), where
        this engine replays them: decode workers do before they serve, so that no
        request ever waits for a recording. The sizes recorded."""
        graphs = self.runner.decode_graphs
        return graphs.record_all() if graphs is not None else []

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams],
                 lora: str | None | list[str | None] = None) -> list[list[Sequence]]:
        """Run prompts to completion together (under one LoRA adapter, or one each);
        returns each request's samples."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        results = [self.add_request(f"generate-{next(self._ids)}", prompt, p, lora=name)
                   for prompt, p, name in zip(prompts, params_list, loras, strict=True)]
        while self.has_unfinished_requests():
            self.step()
        return results

    # ----- the step -------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        ended, self._ended_on_arrival = self._ended_on_arrival, []
        return ended + self._step_batch()

    def _step_batch(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            out = self.runner.run(batch, self.kv_export)
        except Exception:
            log.exception("model step failed; failing %d sequences", len(batch))
            return [self._fail(item.seq) for item in batch]
        sampling = [item for item in sampling_order(batch) if item.samples]
        for item in batch:
            # A draft's positions count once verified (_verify).
            item.seq.num_computed_tokens += item.num_tokens - len(item.draft)
            item.seq.prompt_logprobs.update(out.prompt_logprobs.get(item.seq.seq_id, {}))
            self.blocks.name_full_blocks(item.seq)
        # Each sampling sequence's first row of out.logits: 1 + len(draft) rows each.
        rows = list(itertools.accumulate((1 + len(item.draft) for item in sampling),
                                         initial=0))[:-1]
        outputs = [self._fail(item.seq) for item in sampling if not self._has_matcher(item.seq)]
        logits = first = out.logits
        if outputs or len(rows) != len(logits):  # only live sequences' first rows (a copy)
            keep = [i for i, item in enumerate(sampling) if not item.seq.is_finished]
            sampling, rows = [sampling[i] for i in keep], [rows[i] for i in keep]
            first = logits[rows]
            if not sampling:
                return outputs
        seqs = [item.seq for item in sampling]
        try:
            sampled = self.sampler(first, seqs)
        except Exception:  # never leave the sequences (and their blocks) behind
            log.exception("sampling failed; failing %d sequences", len(seqs))
            return outputs + [self._fail(seq) for seq in seqs]
        # Greedy rows of every draft in one argmax: the common case costs no tensor op
        # per row (only rows the sampler needs, _verify samples one by one).
        drafts = any(item.draft for item in sampling)
        argmax = logits.argmax(dim=-1).tolist() if drafts else None
        for item, row, token in zip(sampling, rows, sampled, strict=True):
            if item.draft:
                self._verify(item, logits, row, token, argmax, outputs)
            else:
                outputs.append(self._append(item.seq, token))
        return outputs

    def _verify(self, item: ScheduledSeq, logits: torch.Tensor, row: int,
                token: SampledToken, argmax: list[int], outputs: list[StepOutput]) -> None:
        """Keep the longest prefix of `item.draft` that decoding reproduces, and the
        token after it. Row `row + j` of `logits` follows the sequence's last token and
        draft[:j]; each row is sampled exactly as plain decoding would sample it, after
        appending the tokens before it (same noise key, penalties, min_tokens, grammar
        state, logprobs), and the draft token is kept when the sample equals it. For a
        draft that puts all its mass on one token this is rejection sampling (accept d
        with probability min(1, p(d) / 1) = p(d), else draw from p with d removed,
        renormalised: together, exactly a draw from p), so greedy and seeded requests
        get the tokens of plain decoding and unseeded ones its distribution. Drafted
        tokens after a finish are dropped; the KV of rejected positions is left to be
        overwritten, and blocks only they used go back."""
        seq, draft, accepted = item.seq, item.draft, 0
        try:
            while True:
                outputs.append(self._append(seq, token))
                if seq.is_finished or accepted == len(draft) \
                        or token.token_id != draft[accepted]:
                    break
                accepted += 1
                index = row + accepted
                token = (SampledToken(argmax[index], None) if plain_argmax(seq)
                         else self.sampler(logits[index:index + 1], [seq])[0])
        except Exception:  # never leave the sequence (and its blocks) behind
            log.exception("verifying the draft of %s failed", seq)
            if not seq.is_finished:
                outputs.append(self._fail(seq))
        self.drafter.record(seq, len(draft), accepted)
        if not seq.is_finished:
            seq.num_computed_tokens += accepted
            self.blocks.name_full_blocks(seq)
            self.blocks.release_tail(seq, seq.num_computed_tokens)

    def _has_matcher(self, seq: Sequence) -> bool:
        """Whether a constrained sequence has its grammar state (made at its first
        sample); False when it cannot be built, which fails that sequence only."""
        if seq.params.grammar is not None and seq.matcher is None:
            try:
                seq.matcher = self.grammar_tokenizer.matcher(seq.params.grammar,
                                                             seq.output_token_ids)
            except Exception:
                log.exception("grammar state of %s could not be built", seq)
                return False
        return True

    def _append(self, seq: Sequence, token: SampledToken) -> StepOutput:
        seq.output_token_ids.append(token.token_id)
        if seq.matcher is not None:
            seq.matcher.advance(token.token_id)
        if token.logprob is not None:
            seq.output_logprobs.append(token.logprob)
        reason = self._finish_reason(seq, token.token_id)
        if reason is not None:
            self._finish(seq, reason)
        prompt_logprobs = None
        if seq.num_output_tokens == 1 and seq.params.prompt_logprobs is not None:
            prompt_logprobs = [seq.prompt_logprobs.get(p) for p in range(seq.num_prompt_tokens)]
        return StepOutput(seq.request_id, seq.sample_index, token.token_id, token.logprob,
                          reason, seq, seq.num_output_tokens - 1, prompt_logprobs)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if seq.matcher is not None and seq.matcher.done:
            return FinishReason.STOP  # the grammar is complete: nothing may follow
        if not params.ignore_eos and token_id in self.model_config.eos_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        if seq.prefill_only:
            return FinishReason.PREFILLED
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        siblings = self.requests.get(seq.request_id, ())
        if all(s.is_finished for s in siblings):
            self.requests.pop(seq.request_id, None)

    def _fail(self, seq: Sequence) -> StepOutput:
        self._finish(seq, FinishReason.ERROR)
        return StepOutput(seq.request_id, seq.sample_index, None, None, FinishReason.ERROR, seq,
                          seq.num_output_tokens)

    # ----- validation -----------------------------------------------------------------

    def _new_sequences(self, request_id: str, prompt: list[int],
                       params: SamplingParams, lora: str | None = None) -> list[Sequence]:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", "must be a SamplingParams")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        self.validate_prompt(prompt)
        if params.grammar is not None:
            compiled(params.grammar)  # cached after the first time: refuses bad grammars
            _ = self.grammar_tokenizer
        digest = None
        if lora is not None:  # resident from now until its sequences end (engine.lora)
            digest = self.lora_registry.acquire(lora, self._loras_in_use()).digest
        seqs = [Sequence(request_id, prompt, params, i) for i in range(params.n)]
        for seq in seqs:
            seq.lora, seq.lora_digest = lora, digest
        self.requests[request_id] = seqs
        return seqs

    @property
    def grammar_tokenizer(self) -> GrammarTokenizer:
        """llguidance's view of the vocabulary, made at the first constrained request."""
        if self._grammar_tokenizer is None:
            path = tokenizer_folder(self.files)
            if path is None or not (path / "tokenizer.json").is_file():
                raise InvalidRequestError("grammar", f"{self.files.name} has no "
                                                     "tokenizer.json to constrain output with")
            self._grammar_tokenizer = GrammarTokenizer(
                path / "tokenizer.json", self.model_config.vocab_size,
                self.model_config.eos_token_ids)
        return self._grammar_tokenizer

    def _check_resume(self, prompt: list[int], params: SamplingParams,
                      resume: list[int]) -> None:
        if not isinstance(params, SamplingParams) or params.n != 1:
            raise InvalidRequestError("resume_token_ids", "a resumed request has one sample")
        if len(resume) > params.max_tokens:
            raise InvalidRequestError(
                "resume_token_ids", f"{len(resume)} tokens resumed are more than "
                f"max_tokens={params.max_tokens}")
        self.validate_prompt(list(prompt) + list(resume))

    def validate_prompt(self, prompt: list[int]) -> None:
        if not isinstance(prompt, list | tuple) or not prompt:
            raise InvalidRequestError("prompt_token_ids", "the prompt is empty")
        vocab = self.model_config.vocab_size
        for index, token in enumerate(prompt):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError(
                    "prompt_token_ids", f"token {token!r} at index {index} is outside the "
                    f"vocabulary [0, {vocab})")
        if len(prompt) > self.max_seq_len:
            raise InvalidRequestError(
                "prompt_token_ids", f"the prompt has {len(prompt)} tokens but at most "
                f"{self.max_seq_len} fit (model context {self.max_model_len}, KV cache "
                f"{self.blocks.capacity_tokens} tokens)")

    # ----- importing KV computed elsewhere --------------------------------------------

    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams,
                lora: str | None = None) -> Sequence:
        """Hold blocks for a prompt whose KV will be imported: the cached prefix of it
        (`seq.num_cached_tokens` positions, at most all but the last token) and fresh
        blocks for the rest, which is all the sender needs to send. `lora`: the adapter
        the KV is computed under. Raises NoCapacityError."""
        if params.n != 1:
            raise InvalidRequestError("n", "imported prompts carry one sample; send n=1")
        probe = self._probe(prompt, lora, request_id, params)
        self.validate_prompt(prompt)
        cached = self.blocks.cached_prefix(probe, len(prompt) - 1)
        if not self.blocks.can_allocate(probe, len(prompt), cached):
            raise NoCapacityError(f"{self.blocks.blocks_for(len(prompt)) - len(cached)} KV "
                                  f"blocks needed, {self.blocks.num_free_blocks} free")
        (seq,) = self._new_sequences(request_id, prompt, params, lora)
        seq.num_cached_tokens = self.blocks.take_prefix(seq, cached)
        self.blocks.record_lookup(len(prompt), seq.num_cached_tokens)
        self.blocks.allocate(seq, len(prompt))
        seq.status = SequenceStatus.RESERVED
        return seq

    def write_imported_kv(self, seq: Sequence, layer: int, start: int,
                          k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V [tokens, kv_heads, head_dim] for positions [start, start + tokens),
        which must lie after the cached prefix (shared blocks are never written)."""
        end = start + k.shape[0]
        if (seq.status != SequenceStatus.RESERVED or end > seq.num_prompt_tokens
                or start < seq.num_cached_tokens):
            raise ValueError(f"cannot import positions [{start}, {end}) into {seq!r}")
        block_size, cache = self.blocks.block_size, self.runner.kv_cache
        k, v = k.to(self.runner.device), v.to(self.runner.device)
        first = contiguous_slots(seq.block_table, start, end, block_size)
        if first is not None:
            cache.write_range(layer, first, k, v)
            return
        slots = slots_for_positions(seq.block_table, start, end, block_size)
        cache.write(layer, torch.tensor(slots, dtype=torch.long, device=self.runner.device),
                    k, v)

    def commit_imported(self, seq: Sequence, first: SampledToken) -> StepOutput:
        """The prompt's KV is complete: add the first token and join the batch."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.name_full_blocks(seq)
        self.scheduler.add_running(seq)
        if seq.params.grammar is not None:
            # Made before the first token, so that it follows that token as the worker
            # that sampled it did: one the grammar refuses (llguidance allows a few that
            # it then rejects) stops the matcher and ends the sequence, as colocated.
            seq.matcher = self.grammar_tokenizer.matcher(seq.params.grammar, [])
        return self._append(seq, first)

    def read_kv(self, seq: Sequence, layer: int, start: int, end: int):
        """Copies of K and V [end - start, kv_heads, head_dim] of positions [start, end)
        of `seq`, from the cache (positions it has computed or holds cached)."""
        if not 0 <= start <= end <= max(seq.num_computed_tokens, seq.num_cached_tokens):
            raise ValueError(f"cannot read positions [{start}, {end}) of {seq!r}")
        slots = slots_for_positions(seq.block_table, start, end, self.blocks.block_size)
        index = torch.tensor(slots, dtype=torch.long, device=self.runner.device)
        k_cache, v_cache = self.runner.kv_cache.layer(layer)
        return k_cache.index_select(0, index), v_cache.index_select(0, index)

    # ----- KV pulled from another worker's prefix cache -------------------------------

    def cached_prefix_tokens(self, prompt: list[int], lora: str | None = None) -> int:
        """Leading tokens of `prompt` this engine's prefix cache holds, in full blocks
        (at most all but the last token, which is always computed), computed under the
        adapter `lora` (None: the base model)."""
        probe = self._probe(prompt, lora)
        return len(self.blocks.cached_prefix(probe, len(prompt) - 1)) * self.blocks.block_size

    def import_prefix(self, prompt: list[int], start: int,
                      layers: list[tuple[torch.Tensor, torch.Tensor]],
                      lora: str | None = None) -> int:
        """Cache K/V computed elsewhere for positions [start, start + n) of `prompt`
        (`layers`: per layer, K and V [n, kv_heads, head_dim]) as named idle blocks, as
        if this engine had computed them, so that the prompt's next admission takes
        them with its cached prefix. Only whole blocks that extend the prefix cached
        here are kept, and only while that prefix is still cached from `start` on (an
        eviction since `start` was read drops the import: it costs speed, never
        correctness). `lora`: the adapter they were computed under. Returns the leading
        tokens of `prompt` cached now."""
        probe = self._probe(prompt, lora)
        if self.blocks.namespace is None:
            return 0
        size = self.blocks.block_size
        held = self.blocks.cached_prefix(probe, len(prompt) - 1)
        count = len(layers[0][0]) if layers else 0
        if len(held) * size < start or start % size:
            return len(held) * size
        end = min(start + count, len(prompt) - 1) // size * size
        names = probe.block_names(size, self.blocks.namespace, end // size)
        keep = set(held)
        for index in range(len(held), len(names)):
            block = self.blocks.adopt(names[index], keep)
            if block is None:
                break
            keep.add(block)
            lo = index * size - start
            for layer, (k, v) in enumerate(layers):
                self.runner.kv_cache.write_range(layer, block * size,
                                                 k[lo:lo + size].to(self.runner.device),
                                                 v[lo:lo + size].to(self.runner.device))
        return len(self.blocks.cached_prefix(probe, len(prompt) - 1)) * size

    def _probe(self, prompt: list[int], lora: str | None, request_id: str = "probe",
               params: SamplingParams | None = None) -> Sequence:
        """A sequence that is never run, to name `prompt`'s blocks under `lora`."""
        probe = Sequence(request_id, prompt, params or SamplingParams(max_tokens=1))
        if lora is not None:
            probe.lora, probe.lora_digest = lora, self.lora_registry.digest(lora)
        return probe

    # ----- LoRA adapters (engine.lora) ------------------------------------------------

    def load_lora(self, name: str, path: str) -> str:
        """Register (or replace, when no unfinished request uses it) the adapter `name`
        from the folder `path`, read and checked now; returns its digest. Raises
        LoraError naming the file at fault."""
        return self.lora_registry.register(name, path, self._loras_in_use())

    def unload_lora(self, name: str) -> None:
        """Forget the adapter `name`; refused (InvalidRequestError) while unfinished
        requests use it, UnknownLoraError when it is not registered."""
        self.lora_registry.unregister(name, self._loras_in_use())

    def loras(self) -> dict[str, str]:
        """Every registered adapter: name -> digest."""
        return self.lora_registry.digests()

    def resident_loras(self) -> list[str]:
        """The adapters whose weights are in memory now."""
        return list(self.lora_registry.resident)

    def _loras_in_use(self) -> frozenset[str]:
        return frozenset(seq.lora for seqs in self.requests.values() for seq in seqs
                         if seq.lora is not None and not seq.is_finished)
