"""The generation worker: entrypoint of an iteration's generation Job (one pod per shard).

The opponent model samples one synthetic response per prompt of its shard and writes
``{output}/shard-{i:05d}-of-{n:05d}.jsonl`` (``data.SyntheticRow`` lines), then, last, the shard's
``.done.json`` record (``data.ShardRecord``); both only if absent. A shard whose record exists is finished: a
rerun exits 0 at once. Whatever the interleaving of retried or duplicated pods, the record describes exactly
the shard content that is stored. With ``--score-reference`` the opponent also scores
the real and the generated responses, so training can skip the reference model.

Engines (``--engine``): vLLM, the production one and the default, or transformers (plain Hugging Face
``generate``: slow, for CPU tests and debugging). There is no fallback: asked for vLLM where it does not
import, the worker exits 2 naming the import error. Both take prompt token ids from ``data.encode_prompt``
(the template training uses: ``--prompt-format``, ``--system-prompt``) and return sampled token ids, and whether
the sample stopped at ``--max-tokens`` rather than at the end-of-turn token (no end-of-turn token is then
appended when it is scored or trained on; the shard record counts such rows).

    python -m spin_k8s.workers.generate --model s3://b/run/iter-0/model --data s3://b/sft.jsonl \\
        --output s3://b/run/iter-0/synthetic --num-shards 4 --run-name demo --iteration 0 --score-reference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from spin_k8s import storage
from spin_k8s.workers import data, runtime

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ENGINES = ("vllm", "transformers")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; ``seed`` is the shard's base seed (request k uses ``seed + k``)."""

    temperature: float  # 0 means greedy
    top_p: float
    max_tokens: int  # new tokens per response
    seed: int


@dataclass(frozen=True)
class GenerateSettings:
    model: str  # opponent model: local directory or s3:// prefix
    data: str  # SFT dataset URI (.jsonl or .parquet)
    output: str  # prefix receiving the shard and its done record
    shard_index: int
    num_shards: int
    run_name: str  # with iteration and shard, determines the sampling seed
    iteration: int
    temperature: float
    top_p: float
    max_tokens: int
    max_prompt_length: int  # tokens; longer prompts keep their end
    max_length: int  # prompt + response tokens, as training will cut them (for scoring)
    max_response_length: int  # response tokens (end-of-turn included) training keeps, at most
    prompt_format: str  # data.PROMPT_FORMATS
    system_prompt: str | None  # chatTemplate only; "" an empty system turn
    engine: str  # vllm | transformers
    score_reference: bool
    dtype: str  # auto | float32 | bfloat16
    batch_size: int  # prompts per forward, transformers engine only
    gpu_memory_utilization: float | None  # vLLM; None: 0.9 with a GPU, 0.1 on CPU (a share of RAM there)
    tensor_parallel_size: int  # vLLM: GPUs one engine shards the model over (the pod's); transformers: 1
    cache_dir: Path  # where s3:// models are downloaded


@dataclass(frozen=True)
class Sample:
    """One sampled response: its token ids without the end-of-turn token, and whether the engine stopped it at
    the token limit instead (then it has no end-of-turn token at all)."""

    ids: list[int]
    length_stopped: bool


def shard_seed(run_name: str, iteration: int, shard_index: int) -> int:
    """The sampling seed of one shard: stable across reruns, different across runs, iterations and shards."""
    digest = hashlib.sha256(f"{run_name}\0{iteration}\0{shard_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x3FFFFFFF  # leaves room for + k per request


class Engine(Protocol):
    name: str
    version: str

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Sample]:
        """One sample per prompt."""

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[float]:
        """Summed log-probs of ``sequence[prompt_len:]`` given ``sequence[:prompt_len]``, per sequence."""

    def close(self) -> None: ...


def _cut_at_eos(ids: Sequence[int], eos: int) -> list[int]:
    out = list(ids)
    return out[:out.index(eos)] if eos in out else out


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint was saved in ("float32", "bfloat16", ...), or "auto" if it does not say."""
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def vllm_engine_args(model_dir: Path, settings: GenerateSettings, max_model_len: int, on_gpu: bool) -> dict[str, Any]:
    """The keyword arguments of vLLM's ``LLM`` for this worker's settings."""
    # vLLM's own "auto" runs a float32 checkpoint in bfloat16 on CPU: its samples and scores would then
    # come from a coarser model than the one training starts from.
    dtype: Any = checkpoint_dtype(model_dir) if settings.dtype == "auto" else settings.dtype
    return {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": dtype,
            "gpu_memory_utilization": settings.gpu_memory_utilization or (0.9 if on_gpu else 0.1),
            "enforce_eager": not on_gpu, "max_model_len": max_model_len,
            # Without it an engine uses one of the pod's GPUs, and a model larger than one GPU does not load.
            "tensor_parallel_size": settings.tensor_parallel_size}


class DoesNotFit(data.DataError):
    """The model cannot run in one shard's memory: an input error (exit 3, not retried), as a retry on the same
    GPUs cannot succeed; the message says how much is needed and how much there is."""


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_GIB = 1024**3


def kv_bytes_per_token(config: Any, dtype: str) -> int | None:
    """Bytes of K and V one token takes in the KV cache of a model with this (transformers) config, in
    ``dtype``; None where the config does not say (the check below is then skipped, vLLM's error stands)."""
    text = config.get_text_config()
    layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        return None
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * _DTYPE_BYTES.get(dtype, 2)


def memory_shortfall(weight_bytes: int, kv_per_token: int, dtype: str, max_model_len: int,
                     tensor_parallel_size: int, budget_per_device: float, on_gpu: bool) -> str | None:
    """Why one ``max_model_len``-token sequence cannot run in a shard's memory, or None. What vLLM must hold per
    device at the least: on a GPU its share of the weights (``weight_bytes`` as the engine holds them, in
    ``dtype``) and of one sequence's KV cache; on CPU the KV cache alone (the weights live in host RAM outside
    the KV share). Activations and CUDA graphs come on top, so passing this check is necessary, not sufficient:
    it names the clear cases before vLLM starts, in numbers (vLLM's own error, raised in its engine process,
    reaches the pod's log only)."""
    kv = kv_per_token * max_model_len
    need = (kv + (weight_bytes if on_gpu else 0)) / tensor_parallel_size
    if need <= budget_per_device:
        return None
    held = (f"weights {_size(weight_bytes)} in {dtype} + " if on_gpu else "") + \
        f"the KV cache of one {max_model_len}-token sequence {_size(kv)}"
    where = "GPU" if on_gpu else "engine (its KV-cache share of host RAM)"
    return (f"does not fit one shard: {_size(need)} per {where} needed ({held}, over tensor_parallel_size "
            f"{tensor_parallel_size}), {_size(budget_per_device)} available; give each shard more GPUs "
            "(spec.generation.gpusPerShard), a larger memory share, or shorter sequences (spec.training.maxLength)")


def _size(n: float) -> str:
    for unit, scale in (("GiB", _GIB), ("MiB", 1024**2)):
        if n >= scale / 10:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def memory_budget(settings: GenerateSettings, on_gpu: bool) -> float:
    """Bytes vLLM may use per device: its memory share of each of the shard's GPUs (the smallest), or on CPU
    of host RAM (VLLM_CPU_KVCACHE_SPACE, in GiB, where set: vLLM's CPU backend takes that instead)."""
    import torch

    share = settings.gpu_memory_utilization or (0.9 if on_gpu else 0.1)
    if on_gpu:
        return share * min(torch.cuda.mem_get_info(i)[1] for i in range(settings.tensor_parallel_size))
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * _GIB
    return share * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class VllmEngine:
    """vLLM's offline ``LLM``. On CPU: eager mode, a small KV-cache share and both cores (FACTS.md)."""

    name = "vllm"

    def __init__(self, model_dir: Path, settings: GenerateSettings, eos: int, max_model_len: int) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        vllm = import_vllm()
        self.version = str(vllm.__version__)
        self._vllm = vllm
        self._eos = eos
        engine_args = vllm_engine_args(model_dir, settings, max_model_len, on_gpu)
        self._check_fit(model_dir, settings, str(engine_args["dtype"]), max_model_len, on_gpu)
        self.llm = vllm.LLM(**engine_args)

    @staticmethod
    def _check_fit(model_dir: Path, settings: GenerateSettings, dtype: str, max_model_len: int, on_gpu: bool) -> None:
        from transformers import AutoConfig

        kv_per_token = kv_bytes_per_token(AutoConfig.from_pretrained(model_dir), dtype)
        if kv_per_token is None:
            return
        stored = _DTYPE_BYTES.get(checkpoint_dtype(model_dir), _DTYPE_BYTES.get(dtype, 2))
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) * _DTYPE_BYTES.get(dtype, 2) // stored
        problem = memory_shortfall(weights, kv_per_token, dtype, max_model_len, settings.tensor_parallel_size,
                                   memory_budget(settings, on_gpu), on_gpu)
        if problem:
            raise DoesNotFit(f"{settings.model}: {problem}")

    def _prompts(self, ids: list[list[int]]) -> list[Any]:
        return [self._vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in ids]

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Sample]:
        # One seed per request makes each sample independent of how vLLM batches and schedules.
        params = [self._vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                            max_tokens=sampling.max_tokens, seed=sampling.seed + k)
                  for k in range(len(prompts))]
        outputs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False)
        # finish_reason "length": stopped at max_tokens; "stop": at the end-of-turn token.
        return [Sample(_cut_at_eos(o.outputs[0].token_ids, self._eos), o.outputs[0].finish_reason == "length")
                for o in outputs]

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[float]:
        # prompt_logprobs=0 returns the log-prob of each actual prompt token; the one sampled token is unused.
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate(self._prompts(sequences), params, use_tqdm=False)
        sums = []
        for output, seq, plen in zip(outputs, sequences, prompt_lens, strict=True):
            per_position: Any = output.prompt_logprobs  # position 0 is None: nothing predicts it
            sums.append(float(sum(per_position[j][seq[j]].logprob for j in range(plen, len(seq)))))
        return sums

    def close(self) -> None:
        # Shutting the engine core down before exit avoids the abort (exit 134) seen at interpreter exit.
        self.llm.llm_engine.engine_core.shutdown()


class TransformersEngine:
    """``model.generate`` in batches of left-padded prompts; scoring with the trainer's log-prob helper."""

    name = "transformers"

    def __init__(self, model_dir: Path, settings: GenerateSettings, tokenizer: PreTrainedTokenizerBase) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self._torch = torch
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)  # in eval mode
        self.batch_size = settings.batch_size
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        assert isinstance(eos, int)
        self.eos = eos
        self.pad = pad if isinstance(pad, int) else eos

    def _padded(self, seqs: list[list[int]], left: bool) -> tuple[Any, Any]:
        width = max(len(s) for s in seqs)
        ids = self._torch.full((len(seqs), width), self.pad, dtype=self._torch.long)  # (B, T)
        mask = self._torch.zeros((len(seqs), width), dtype=self._torch.long)  # (B, T)
        for row, s in enumerate(seqs):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, cols] = self._torch.tensor(s)
            mask[row, cols] = 1
        return ids, mask

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Sample]:
        out: list[Sample] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            ids, mask = self._padded(batch, left=True)  # (B, T) each
            self._torch.manual_seed(sampling.seed + start)
            greedy = sampling.temperature == 0
            with self._torch.no_grad():
                sampled = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                    top_k=None, eos_token_id=self.eos, pad_token_id=self.pad)  # (B, T + new)
            # A row that reached the end-of-turn token has it (then padding); one without it hit max_new_tokens.
            out.extend(Sample(_cut_at_eos(row, self.eos), self.eos not in row)
                       for row in sampled[:, ids.shape[1]:].tolist())
        return out

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[float]:
        from spin_k8s.workers.loss import sequence_logps

        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start:start + self.batch_size]
            ids, mask = self._padded(batch, left=False)  # (B, T) each
            response = mask.clone()  # (B, T)
            for row, plen in enumerate(prompt_lens[start:start + self.batch_size]):
                response[row, :plen] = 0
            with self._torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            out.extend(sequence_logps(logits, ids, response).tolist())
        return out

    def close(self) -> None:
        pass


def import_vllm() -> Any:
    """The ``vllm`` module; where it does not import, a :class:`runtime.UsageError` (exit 2: a rerun of the
    same image cannot succeed) naming the error, never a fallback to the slow engine."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        import vllm
    except (ImportError, OSError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the error's text
        raise runtime.UsageError(f"--engine vllm: vllm does not import ({detail}); use an image with a "
                                 "working vLLM, or --engine transformers (slow, for CPU tests and debugging)") from exc
    return vllm


def open_engine(settings: GenerateSettings, model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Engine:
    if settings.engine == "vllm":
        eos = tokenizer.eos_token_id
        assert isinstance(eos, int)
        # Scoring a sequence of max_length tokens also samples one token: hence + 1, within the model's reach.
        longest = max(settings.max_prompt_length + settings.max_tokens, settings.max_length) + 1
        context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", longest)
        return VllmEngine(model_dir, settings, eos, max_model_len=min(longest, int(context)))
    return TransformersEngine(model_dir, settings, tokenizer)


def run(settings: GenerateSettings, engine: Engine | None = None) -> int:
    """Generates (and scores) one shard. ``engine``: an open engine to reuse, left open for the caller;
    by default one is opened for this shard and closed after it."""
    n, i = settings.num_shards, settings.shard_index
    shard_uri = storage.join(settings.output, data.shard_name(i, n))
    done_uri = storage.join(settings.output, data.done_name(i, n))
    if storage.exists(done_uri):
        runtime.log(event="skip", reason="shard already done", done=done_uri)
        return 0
    if engine is None and settings.engine == "vllm":
        import_vllm()  # a broken image fails here, before the dataset and the model are fetched
    sft = data.load_sft(settings.data)
    if sft.bad:
        print(f"warning: {settings.data}: {sft.summary()}", file=sys.stderr, flush=True)
    start, stop = data.shard_bounds(len(sft.examples), i, n)
    examples = sft.examples[start:stop]
    runtime.log(event="start", shard=i, num_shards=n, rows=len(examples), bad_rows=len(sft.bad))

    model_dir = runtime.fetch_model(settings.model, settings.cache_dir)
    # The opponent's digest reads every weight file (tens of seconds for a 7B model): it runs while the engine
    # generates (hashlib releases the GIL), not after.
    pool = ThreadPoolExecutor(max_workers=1)
    digest = pool.submit(runtime.model_digest, model_dir)
    pool.shutdown(wait=False)
    tokenizer = runtime.load_tokenizer(model_dir, settings.model)
    template = data.Template(settings.prompt_format, settings.system_prompt)
    prompts = [data.encode_prompt(tokenizer, ex.prompt, settings.max_prompt_length, template) for ex in examples]
    sampling = Sampling(settings.temperature, settings.top_p, settings.max_tokens,
                        shard_seed(settings.run_name, settings.iteration, i))
    owned = engine is None
    engine = engine or open_engine(settings, model_dir, tokenizer)
    try:
        began = time.monotonic()
        generated = engine.generate(prompts, sampling) if prompts else []
        seconds = time.monotonic() - began
        new_tokens = sum(len(g.ids) for g in generated)
        length_stopped = sum(g.length_stopped for g in generated)
        runtime.log(event="generated", rows=len(generated), tokens=new_tokens, length_stopped=length_stopped,
                    seconds=round(seconds, 3), tokens_per_s=round(new_tokens / max(seconds, 1e-9), 1))
        ref_real: list[float | None] = [None] * len(examples)
        ref_generated: list[float | None] = [None] * len(examples)
        if settings.score_reference and examples:
            began = time.monotonic()

            def room(prompt: list[int]) -> int:
                return data.response_room(settings.max_length, len(prompt), settings.max_response_length)

            # Scored exactly as training will tokenize them: real rows first, then generated ones.
            sequences = [p + data.encode_response(tokenizer, ex.prompt, ex.response, room(p), template)
                         for ex, p in zip(examples, prompts, strict=True)]
            sequences += [p + data.encode_response(tokenizer, ex.prompt, g.ids, room(p), template,
                                                   ended=not g.length_stopped)
                          for ex, p, g in zip(examples, prompts, generated, strict=True)]
            scores = engine.score(sequences, [len(p) for p in prompts * 2])
            ref_real, ref_generated = list(scores[:len(examples)]), list(scores[len(examples):])
            runtime.log(event="scored", sequences=len(sequences), seconds=round(time.monotonic() - began, 3))
    finally:
        if owned:
            engine.close()

    rows = [data.SyntheticRow(id=ex.id, prompt=ex.prompt, real=ex.response,
                              generated=str(tokenizer.decode(g.ids, skip_special_tokens=True)), generated_ids=g.ids,
                              length_stopped=g.length_stopped, ref_real_logp=rr, ref_generated_logp=rg)
            for ex, g, rr, rg in zip(examples, generated, ref_real, ref_generated, strict=True)]
    body = "".join(row.to_json() + "\n" for row in rows).encode()
    try:
        storage.write_bytes(shard_uri, body, if_absent=True)
    except storage.AlreadyExistsError:
        # A twin pod, or an attempt that died before writing its record, stored this shard first. Writes are
        # whole, so it is complete: keep it, and let the record describe what is stored, never a mix.
        body = storage.read_bytes(shard_uri)
    record = data.ShardRecord(
        shard=i, num_shards=n, rows=body.count(b"\n"), sha256=storage.sha256_bytes(body), engine=engine.name,
        engine_version=engine.version, sampling=asdict(sampling), model=settings.model,
        model_digest=digest.result(), scored=settings.score_reference,
        max_prompt_length=settings.max_prompt_length, max_length=settings.max_length,
        max_response_length=settings.max_response_length, prompt_format=settings.prompt_format,
        system_prompt=settings.system_prompt, data=settings.data,
        length_stopped=sum(json.loads(line)["length_stopped"] for line in body.splitlines()))
    try:
        storage.write_bytes(done_uri, record.to_json().encode(), if_absent=True)
    except storage.AlreadyExistsError:
        # A twin pod finished the same shard first; its record stands (training checks shard digests).
        runtime.log(event="skip", reason="another attempt finished this shard first", done=done_uri)
        return 0
    runtime.log(event="done", shard=shard_uri, done=done_uri, rows=record.rows, sha256=record.sha256,
                engine=engine.name)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spin_k8s.workers.generate",
        description="Generate one shard of an iteration's synthetic responses with the opponent model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m spin_k8s.workers.generate --model s3://b/run/iter-0/model \\\n"
               "    --data s3://b/sft.jsonl --output s3://b/run/iter-0/synthetic --num-shards 4 \\\n"
               "    --run-name demo --iteration 0 --score-reference\n"
               "exit codes: 0 done or already done, 2 bad usage or unusable data, other: retry",
    )
    a = p.add_argument
    a("--model", required=True, help="opponent model: local directory or s3:// prefix "
      "(example: s3://spin/demo/iter-0/model)")
    a("--data", required=True, help="SFT dataset, .jsonl or .parquet, chat-shaped ('messages') or "
      "'prompt'/'response' rows (example: s3://spin/data/ultrachat-50k.parquet)")
    a("--output", required=True, help="prefix for the shard and its done record "
      "(example: s3://spin/demo/iter-0/synthetic)")
    a("--num-shards", type=int, default=1, help="total shards, one per Job index (default 1; example: 4)")
    a("--shard-index", type=int, default=None, help="this shard, 0-based (default: $JOB_COMPLETION_INDEX, "
      "else 0; example: 2)")
    a("--run-name", default="spin", help="run name, part of the sampling seed (default spin; example: demo)")
    a("--iteration", type=int, default=0, help="SPIN iteration, part of the seed (default 0; example: 1)")
    a("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0; example: 0.7)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0; example: 0.95)")
    a("--max-tokens", type=int, default=256, help="new tokens per response (default 256; example: 512)")
    a("--max-prompt-length", type=int, default=512, help="prompt tokens kept, from the end (default 512; example: 256)")
    a("--max-length", type=int, default=1024, help="prompt + response tokens as training cuts them, used "
      "when scoring; must equal training's (default 1024; example: 2048)")
    runtime.add_template_flags(p)
    a("--engine", choices=ENGINES, default="vllm", help="vllm (the production engine; exit 2 if it does not "
      "import, no fallback) or transformers (slow: CPU tests and debugging) (default vllm; example: transformers)")
    a("--score-reference", action="store_true", help="also store the opponent's summed log-probs of the real "
      "and generated responses, so training needs no reference model (example: --score-reference)")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="weights dtype; auto = the checkpoint's (default auto; example: bfloat16)")
    a("--batch-size", type=int, default=16,
      help="prompts per forward, transformers engine only (default 16; example: 64)")
    a("--gpu-memory-utilization", type=float, default=None, help="vLLM memory share; default 0.9 with a "
      "GPU, 0.1 on CPU where it is a share of RAM (example: 0.85)")
    a("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs one engine shards the model over, "
      "the pod's GPU count; the transformers engine cannot shard and refuses more than 1 (default 1; example: 4)")
    a("--cache-dir", type=Path, default=None, help="local cache for s3:// models (default $SPIN_CACHE_DIR "
      "or /tmp/spin-cache; example: /cache)")
    return p


def settings_from_args(argv: Sequence[str] | None) -> GenerateSettings:
    args = parser().parse_args(argv)
    index = args.shard_index
    if index is None:
        env = os.environ.get("JOB_COMPLETION_INDEX", "0")
        if not env.isdigit():
            raise runtime.UsageError(f"JOB_COMPLETION_INDEX is not a number: {env!r}")
        index = int(env)
    if args.num_shards < 1 or not 0 <= index < args.num_shards:
        raise runtime.UsageError(f"--shard-index {index} is outside 0..{args.num_shards - 1}")
    if args.max_tokens < 1 or args.max_prompt_length < 1 or args.max_length <= args.max_prompt_length:
        raise runtime.UsageError("need --max-tokens >= 1 and --max-length > --max-prompt-length >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise runtime.UsageError("need --temperature >= 0 and 0 < --top-p <= 1")
    if args.tensor_parallel_size < 1:
        raise runtime.UsageError("need --tensor-parallel-size >= 1")
    if args.engine == "transformers" and args.tensor_parallel_size > 1:
        raise runtime.UsageError(f"--engine transformers cannot shard a model over GPUs: --tensor-parallel-size "
                                 f"{args.tensor_parallel_size} needs --engine vllm (or 1 GPU per shard)")
    template = runtime.template_from_args(args)
    return GenerateSettings(
        model=args.model, data=args.data, output=args.output, shard_index=index, num_shards=args.num_shards,
        run_name=args.run_name, iteration=args.iteration, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
        max_response_length=runtime.response_cap_from_args(args),
        prompt_format=template.format, system_prompt=template.system_prompt, engine=args.engine,
        score_reference=args.score_reference, dtype=args.dtype, batch_size=args.batch_size,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        cache_dir=args.cache_dir or runtime.default_cache_dir(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return runtime.run_cli(lambda: run(settings_from_args(argv)))


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips interpreter teardown, where vLLM's CPU build sometimes aborts after finishing
