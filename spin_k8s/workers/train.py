"""The training worker: entrypoint of an iteration's DeepSpeed Job, one process per accelerator under
torchrun (rank, world size and local rank come from the environment torchrun sets):

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $JOB_COMPLETION_INDEX --master-addr run-i0-train-0.run \\
        --master-port 29500 -m spin_k8s.workers.train --model s3://b/run/iter-0/model \\
        --synthetic 0=s3://b/run/iter-0/synthetic --iteration 0 --output s3://b/run/iter-1/model \\
        --checkpoint-dir s3://b/run/iter-0/checkpoints --checkpoint-every 100

Flow: read the mixed synthetic sets -> tokenize pairs with the generation worker's template -> check the
reference log-probs the shards carry on a sample against the trainer's own forward, and distrust them all if
they disagree -> fill the reference log-probs still missing (one no-grad pass of the initial model, before any
update: at step 0 the policy is the reference) -> resume from the latest DeepSpeed checkpoint, if any -> train
(forward, SPIN loss, backward, step, log, checkpoint) -> optional held-out evaluation -> Hugging Face checkpoint
+ tokenizer, then ``metrics.json`` last. The policy trains without dropout (``disable_dropout``), and the
learning-rate schedule may span more epochs than are trained (``--schedule-epochs``, as the authors' scripts).
An output that already has ``metrics.json`` is finished: a rerun exits 0 at once.

The reference check: a generation engine's log-probs (vLLM's kernels, often bf16, maybe another torch) differ
from the trainer's, and any error enters the loss as beta times the margin error. So before step 0 the trainer
rescores a seeded sample of the pairs with shard values (``--reference-check-pairs``, 256) and records the
per-sequence differences and the beta-scaled margin differences in ``metrics.json`` (``reference_check``,
which the controller copies into lineage). When the mean beta-scaled margin difference exceeds
``--reference-tolerance`` (0.05 in units of the loss's logit beta * margin: it moves a pair's step-0 loss weight
sigmoid(-beta * margin) by about a hundredth), every reference log-prob is recomputed by the trainer. fp32
engines agree with the trainer within about 1e-4 nats per sequence and pass by far; bf16 ones (8 bits of mantissa)
may drift by tenths of a nat over a long answer, which beta 0.1 scales to a few hundredths and the paper's
beta 5.0 to more than 1: the default accepts the first and refuses the second.

Run as a plain ``python -m`` process it trains alone (world size 1).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_k8s import storage
from spin_k8s.workers import batching, data, runtime
from spin_k8s.workers.loss import LOSS_TYPES

# Positions projected to the vocabulary at a time (``loss.response_logps``): their fp32 logits are 128 MiB at a
# 32k vocabulary, 512 MiB at 128k, where a whole micro-batch's would be many GiB.
LOGITS_CHUNK_TOKENS = 1024

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TrainSettings:
    model: str  # the iteration's starting model p_t: policy initialisation and frozen reference
    synthetic: Mapping[int, str] = field(hash=False)  # iteration -> its synthetic set's prefix
    iteration: int
    keep_previous: int  # previous iterations' synthetic sets mixed in (1 in the paper)
    output: str  # prefix for the trained model, tokenizer and metrics.json
    eval_data: str | None  # held-out synthetic set for reward accuracy after training
    holdout_fraction: float  # share of prompts (by id) never trained on, evaluated on the newest set instead
    checkpoint_dir: str | None  # DeepSpeed checkpoints: a shared path or an s3:// prefix
    checkpoint_every: int  # optimizer steps between checkpoints; 0 disables them
    checkpoints_to_keep: int  # newest checkpoints kept, locally and in storage, once a newer one is complete (>= 1)
    zero_stage: int  # 0..3
    precision: str  # bf16 | fp32
    optimizer: str  # rmsprop (paper) | adamw
    learning_rate: float
    beta: float
    loss_type: str  # sigmoid | hinge
    warmup_ratio: float  # share of the schedule's steps with a linear warmup, then linear decay to 0
    epochs: int  # passes over the pairs: where training stops
    schedule_epochs: int  # epochs the learning-rate schedule spans (>= epochs; the authors: 6, stopping after 2)
    max_steps: int  # 0: epochs * (pairs // global batch); else the steps trained, and the schedule's if no epochs
    length_grouping: bool  # global batches of pairs of similar length (batching.GROUP_WINDOW); off: plain random
    micro_batch_size: int  # pairs per process per forward
    logits_chunk_tokens: int  # response positions whose fp32 logits exist at once (LOGITS_CHUNK_TOKENS); 0: all
    gradient_accumulation_steps: int
    max_length: int  # prompt + response tokens
    max_prompt_length: int
    max_response_length: int  # response tokens (end-of-turn included), at most
    prompt_format: str  # data.PROMPT_FORMATS: must be the one the shards were generated with
    system_prompt: str | None  # likewise
    max_grad_norm: float  # 0 disables clipping
    gradient_checkpointing: bool
    reference: str  # precomputed (shards, else one pass before training) | live (a frozen model copy)
    reference_check_pairs: int  # pairs with shard reference log-probs rescored before step 0; 0: none
    reference_tolerance: float  # largest mean beta * |margin difference| trusted, in units of the loss's logit
    seed: int
    cache_dir: Path

    @property
    def template(self) -> data.Template:
        return data.Template(self.prompt_format, self.system_prompt)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    node: int = 0  # the node rank (torchrun's GROUP_RANK, the pod's completion index): 0 for a plain process


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at optimizer step ``step``: linear warmup over ``warmup`` steps, then linear
    decay to 0 at ``total`` (as Hugging Face's ``get_linear_schedule_with_warmup``)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def schedule_steps(s: TrainSettings, per_epoch: int) -> tuple[int, int]:
    """(steps trained, steps the learning-rate schedule spans). The schedule may be longer than training: the
    authors' scripts ran a 6-epoch linear schedule and stopped after 2, where the learning rate is still about
    0.74 of its peak; a schedule as long as training would have decayed to 0 there."""
    steps = s.max_steps or s.epochs * per_epoch
    return steps, s.schedule_epochs * per_epoch if s.schedule_epochs else steps


def disable_dropout(config: Any) -> dict[str, float]:
    """Sets every dropout probability of a model config (and of its sub-configs) to 0, before the model is built
    from it; returns the ones that were not 0, by name. The loss compares the policy, in training mode, with
    reference log-probs computed without dropout: with dropout on, the step-0 loss would not be ln 2 and every
    margin would carry noise (TRL's DPO trainer, the authors' base, disables it too). Attention dropout is a
    config value read by the attention function, not a module: zeroing modules alone would miss it."""
    from transformers import PretrainedConfig

    was: dict[str, float] = {}
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            was.update({f"{name}.{k}": v for k, v in disable_dropout(value).items()})
        elif (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float):
            if value:
                was[name] = value
            setattr(config, name, 0.0)
    return was


def load_policy(model_dir: Path, dtype: torch.dtype) -> tuple[Any, dict[str, float]]:
    """(the policy to train, the dropout probabilities turned off in it: ``disable_dropout``), loaded in ``dtype``,
    the training precision. With bf16, DeepSpeed casts the module to bf16 anyway and keeps the fp32 master
    weights in its optimizer, made from the bf16 ones: an fp32 load gave the same numbers at a cost. From a bf16
    checkpoint (as 7B models are published) a bf16 load keeps the weights in the mapped file's pages, which the
    node's ranks share (copied on write only); an fp32 load made each rank a private copy twice the file's size
    (8 x 29 GB for a 7B model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dropout = disable_dropout(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    for module in model.modules():  # dropout an architecture builds with a fixed probability, not from its config
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
    model.config.use_cache = False
    return model, dropout


def deepspeed_config(s: TrainSettings, world_size: int, node_local_checkpoints: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.zero_stage == 3:
        # Without it a ZeRO-3 model cannot be saved whole. Tensors under 10k elements (norms, biases) stay
        # whole on every rank; DeepSpeed's 100k default would leave every matrix of a small model whole too.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=10_000)
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "train_batch_size": s.micro_batch_size * s.gradient_accumulation_steps * world_size,
        "gradient_clipping": s.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": s.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the torch optimizers we pass in need no C++ op builds
        "checkpoint": {"use_node_local_storage": node_local_checkpoints},
        "steps_per_print": 1 << 62,
    }


# --- Processes -----------------------------------------------------------------------------------------------


def init_distributed() -> Dist:
    """Joins the process group torchrun describes, or makes a group of one for a plain process."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's collectives call torch APIs that warn on every step; the warnings would drown the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                int(os.environ.get("GROUP_RANK", "0")))


def barrier() -> None:
    import torch.distributed

    torch.distributed.barrier()


# --- Data ----------------------------------------------------------------------------------------------------


def load_pairs(uris: Sequence[str], tokenizer: PreTrainedTokenizerBase, s: TrainSettings,
               ref_digest: str, held_out: bool | None = None) -> list[batching.Pair]:
    """Tokenized pairs of the synthetic sets. A shard's reference log-probs are kept only if the shard
    was scored by this very reference model with the same length limits; the rest are filled later.
    ``held_out``: keep only the held-out rows (True), only the others (False), or all (None)."""
    pairs = []
    for uri in uris:
        for row, record in data.load_synthetic(uri).rows:
            if held_out is not None and data.is_held_out(row.id, s.holdout_fraction) != held_out:
                continue
            if record.template != s.template:
                raise data.DataError(f"{uri}: shard {record.shard} was generated with the prompt {record.template}, "
                                     f"training uses {s.template}: its samples answer another prompt")
            prompt = data.encode_prompt(tokenizer, row.prompt, s.max_prompt_length, s.template)
            room = data.response_room(s.max_length, len(prompt), s.max_response_length)
            limits = (record.max_length, record.max_prompt_length, record.max_response_length)
            trusted = (record.scored and record.model_digest == ref_digest
                       and limits == (s.max_length, s.max_prompt_length, s.max_response_length))
            try:
                real = data.encode_response(tokenizer, row.prompt, row.real, room, s.template)
            except data.DataError as exc:
                raise data.DataError(f"{uri}: row {row.id}: {exc}") from exc
            pairs.append(batching.Pair(
                real=prompt + real,
                generated=prompt + data.encode_response(tokenizer, row.prompt, row.generated_ids, room, s.template,
                                                        ended=not row.length_stopped),
                prompt_len=len(prompt),
                ref_real=row.ref_real_logp if trusted else None,
                ref_generated=row.ref_generated_logp if trusted else None,
            ))
    return pairs


def _mask(model: Any, batch: batching.Batch) -> torch.Tensor:
    """The batch's attention mask as the additive float mask every attention implementation takes (0 where a
    position may attend, the dtype's minimum where not), in the model's compute dtype."""
    import torch

    dtype = getattr(model, "module", model).get_input_embeddings().weight.dtype
    return torch.zeros(batch.attention_mask.shape, dtype=dtype, device=batch.attention_mask.device).masked_fill(
        ~batch.attention_mask, torch.finfo(dtype).min)


def last_position(model: Callable[..., Any], batch: batching.Batch) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One forward of the model (a DeepSpeed engine or a Hugging Face model) whose own LM head computes the last
    position only: (its logits (B, 1, V), the decoder's final hidden states (B, T, H), the LM head). The model
    runs whole, as its forward hooks (ZeRO-3 gathers weights in them) expect; the hidden states are taken from
    the decoder on the way."""
    net: Any = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    hidden: list[torch.Tensor] = []
    hook = net.get_decoder().register_forward_hook(lambda _module, _args, out: hidden.append(out[0]))
    try:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=_mask(model, batch),
                    logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return out.logits, hidden[0], net.get_output_embeddings()


def batch_logps(model: Callable[..., Any], batch: batching.Batch,
                chunk_tokens: int = LOGITS_CHUNK_TOKENS) -> torch.Tensor:
    """Summed response log-probs of the batch's B pairs in one forward; (2B,), real first. The response
    positions' hidden states are projected by ``loss.response_logps``, ``chunk_tokens`` at a time; 0: from the
    model's own logits, whole (for an architecture whose logits are not its LM head's output:
    ``head_gives_the_logits``)."""
    from spin_k8s.workers.loss import logits_logps, response_logps

    if not chunk_tokens:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=_mask(model, batch),
                    use_cache=False)
        return logits_logps(out.logits, batch.targets, 2 * batch.pairs)  # (2B,)
    _, hidden, head = last_position(model, batch)
    return response_logps(hidden, head, batch.targets, 2 * batch.pairs, chunk_tokens)  # (2B,)


def head_gives_the_logits(model: Callable[..., Any], batch: batching.Batch) -> bool:
    """Whether the model's logits are its LM head (a linear layer) applied to the decoder's final hidden states,
    as the chunked log-probs assume: not for an architecture whose forward transforms them (Gemma 2's
    soft-capping, Cohere's logit scale). Where nothing happens in between, the model's own last-position logits
    and the head applied to the same hidden state are the same operation on the same tensor: bit for bit equal.
    Call without gradients, on every rank (the head's call gathers its weights under ZeRO-3)."""
    import torch

    logits, hidden, head = last_position(model, batch)
    return isinstance(head, torch.nn.Linear) and torch.equal(logits, head(hidden[:, -1:]))


def score_pairs(model: Callable[..., Any], pairs: Sequence[batching.Pair], todo: Sequence[int], dist: Dist,
                s: TrainSettings, pad_id: int, device: torch.device) -> dict[int, tuple[float, float]]:
    """(real, generated) summed log-probs of ``pairs[i]`` for i in ``todo``, computed without gradients
    with the work split over the ranks, and known to every rank afterwards."""
    import torch
    import torch.distributed

    ordered = sorted(todo, key=lambda i: -pairs[i].length)  # similar lengths share a batch
    per_rank = math.ceil(len(ordered) / dist.world_size)
    mine = ordered[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    found: dict[int, tuple[float, float]] = {}
    # Every rank runs the same number of forwards: under ZeRO-3 each one gathers weights collectively.
    for start in range(0, per_rank, s.micro_batch_size):
        chunk = mine[start:start + s.micro_batch_size]
        batch = batching.collate([pairs[i] for i in chunk or ordered[:1]], pad_id).to(device)
        with torch.no_grad():
            logps = batch_logps(model, batch, s.logits_chunk_tokens).tolist()
        found.update((i, (logps[k], logps[len(chunk) + k])) for k, i in enumerate(chunk))
    gathered: list[dict[int, tuple[float, float]]] = [{} for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(gathered, found)
    return {i: v for part in gathered for i, v in part.items()}


def check_reference(model: Callable[..., Any], pairs: Sequence[batching.Pair], s: TrainSettings, dist: Dist,
                    pad_id: int, device: torch.device) -> dict[str, Any] | None:
    """Rescores a seeded sample of the pairs that carry shard reference log-probs with the model's own forward
    (before the first step the policy is the reference) and compares: absolute differences per sequence, and
    of the margin the loss sees, beta * |(shard real - shard generated) - (own real - own generated)|; max and
    mean of each. ``fallback``: the mean margin difference exceeds the tolerance, so no shard value is to be
    trusted. None when no pair carries shard values or the check is off.

    Every rank draws the same sample and receives every score (``score_pairs``): all reach the same decision.
    """
    import torch

    pool = [i for i, p in enumerate(pairs) if p.ref_real is not None]
    if not pool or not s.reference_check_pairs:
        return None
    sample = sorted(random.Random(s.seed).sample(pool, min(s.reference_check_pairs, len(pool))))
    own = score_pairs(model, pairs, sample, dist, s, pad_id, device)
    shard = torch.tensor([(pairs[i].ref_real, pairs[i].ref_generated) for i in sample], dtype=torch.float64)  # (N, 2)
    mine = torch.tensor([own[i] for i in sample], dtype=torch.float64)  # (N, 2)
    sequence = (shard - mine).abs()  # (N, 2)
    margin = s.beta * ((shard[:, 0] - shard[:, 1]) - (mine[:, 0] - mine[:, 1])).abs()  # (N,)
    return {"pairs": len(sample), "tolerance": s.reference_tolerance,
            "logp_abs_diff/max": sequence.max().item(), "logp_abs_diff/mean": sequence.mean().item(),
            "beta_margin_abs_diff/max": margin.max().item(), "beta_margin_abs_diff/mean": margin.mean().item(),
            "fallback": margin.mean().item() > s.reference_tolerance}


def with_reference(pairs: list[batching.Pair], scores: Mapping[int, tuple[float, float]]) -> list[batching.Pair]:
    return [replace(p, ref_real=scores[i][0], ref_generated=scores[i][1]) if i in scores else p
            for i, p in enumerate(pairs)]


def evaluate(engine: Any, pairs: list[batching.Pair], s: TrainSettings, dist: Dist, pad_id: int) -> dict[str, float]:
    """Reward accuracy and margin of the current policy on held-out pairs (with reference log-probs): how
    well the model tells real from synthetic responses. Near 0.5 accuracy and 0 margin, it no longer can."""
    import torch

    from spin_k8s.workers.loss import spin_loss

    engine.eval()
    scores = score_pairs(engine, pairs, range(len(pairs)), dist, s, pad_id, engine.device)
    engine.train()
    policy = torch.tensor([scores[i] for i in range(len(pairs))])  # (N, 2)
    ref = torch.tensor([(p.ref_real, p.ref_generated) for p in pairs])  # (N, 2)
    losses, real, generated = spin_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], s.beta, s.loss_type)
    return {"eval/loss": losses.mean().item(), "eval/rewards/accuracies": (real > generated).float().mean().item(),
            "eval/rewards/margins": (real - generated).mean().item(), "eval/pairs": float(len(pairs))}


# --- Checkpoints ---------------------------------------------------------------------------------------------


def local_checkpoint_dir(s: TrainSettings) -> Path:
    """Where DeepSpeed writes checkpoints: the directory itself, or a node-local staging copy of an S3 one."""
    assert s.checkpoint_dir is not None
    if not storage.is_s3(s.checkpoint_dir):
        return Path(storage.parse(s.checkpoint_dir).key)
    return s.cache_dir / "checkpoints" / hashlib.sha256(s.checkpoint_dir.encode()).hexdigest()[:24]


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"  # zero-padded: tags sort as their steps do


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint tag; None for any other name (``latest``, a stray file)."""
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def stale_tags(tags: Iterable[str], current: str, keep: int) -> list[str]:
    """The checkpoints to delete once ``current`` and the ``latest`` marker naming it are complete: all but the
    ``keep`` newest up to ``current`` (which is always kept). A tag after ``current`` can only be an upload a
    crash cut short, which this run writes again: left alone. Other names (``latest``) are never checkpoints."""
    last = checkpoint_step(current)
    assert last is not None
    steps = {step: tag for tag in tags if (step := checkpoint_step(tag)) is not None and step <= last}
    return [steps[step] for step in sorted(steps)][:-keep]


def prune_checkpoints(s: TrainSettings, dist: Dist, current: str) -> list[str]:
    """Deletes the stale checkpoints: in storage from rank 0, and from each node's local staging copy (S3 only;
    a shared path is both) from its local rank 0; returns the tags deleted from storage (rank 0; [] elsewhere).
    Runs only after ``current`` and its ``latest`` marker are written, so a crash at any point here still
    leaves that complete checkpoint to resume from. A deletion that fails is logged and tried again at the
    next checkpoint: it costs disk, never the run."""
    assert s.checkpoint_dir is not None
    deleted: list[str] = []
    try:
        if dist.rank == 0:
            base = storage.parse(s.checkpoint_dir).key.rstrip("/")
            tags = {storage.parse(uri).key[len(base):].strip("/").split("/")[0]
                    for uri in storage.list_uris(s.checkpoint_dir)}
            for tag in stale_tags(tags, current, s.checkpoints_to_keep):
                storage.delete_prefix(storage.join(s.checkpoint_dir, tag))
                deleted.append(tag)
        local = local_checkpoint_dir(s)
        if storage.is_s3(s.checkpoint_dir) and dist.local_rank == 0 and local.is_dir():
            for tag in stale_tags((p.name for p in local.iterdir() if p.is_dir()), current, s.checkpoints_to_keep):
                shutil.rmtree(local / tag)
    except Exception as exc:  # see the docstring: never worth a failed run
        runtime.log(event="prune_failed", rank=dist.rank, tag=current, error=f"{type(exc).__name__}: {exc}")
    return deleted


def save_checkpoint(engine: Any, s: TrainSettings, dist: Dist, step: int, history: list[dict[str, float]]) -> None:
    assert s.checkpoint_dir is not None
    tag = checkpoint_tag(step)
    local = local_checkpoint_dir(s)
    engine.save_checkpoint(str(local), tag=tag, client_state={"step": step, "history": history})
    if storage.is_s3(s.checkpoint_dir):
        barrier()
        if dist.local_rank == 0:  # each node uploads what its ranks wrote
            storage.upload_dir(local / tag, storage.join(s.checkpoint_dir, tag))
        barrier()
        if dist.rank == 0:  # "latest" last: it only ever names a complete upload
            storage.write_bytes(storage.join(s.checkpoint_dir, "latest"), tag.encode())
    barrier()  # every rank's part, and "latest", are written: only now may older checkpoints go
    deleted = prune_checkpoints(s, dist, tag)
    if dist.rank == 0:
        runtime.log(event="checkpoint", step=step, tag=tag, uri=s.checkpoint_dir, deleted=deleted)


def restore(engine: Any, s: TrainSettings, dist: Dist) -> tuple[int, list[dict[str, float]]]:
    """(steps already done, their metrics) from the latest checkpoint; (0, []) without one.

    From S3, each node's local rank 0 stages the checkpoint on its node unless it is there already, and logs
    one ``fetched`` event (node rank, tag, local path, ``downloaded``): a pod that starts on an empty disk must
    show ``downloaded: true``, whatever another pod left behind."""
    if s.checkpoint_dir is None:
        return 0, []
    local = local_checkpoint_dir(s)
    if storage.is_s3(s.checkpoint_dir):
        try:
            tag = storage.read_bytes(storage.join(s.checkpoint_dir, "latest")).decode().strip()
        except storage.NotFoundError:
            return 0, []
        if dist.local_rank == 0:
            downloaded = not (local / tag).is_dir()
            if downloaded:
                storage.download_dir(storage.join(s.checkpoint_dir, tag), local / tag)
            runtime.log(event="fetched", node=dist.node, tag=tag, path=str(local / tag), downloaded=downloaded)
        barrier()
    else:
        if not (local / "latest").is_file():
            return 0, []
        tag = (local / "latest").read_text().strip()
    path, client = engine.load_checkpoint(str(local), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {s.checkpoint_dir}")
    if dist.rank == 0:
        runtime.log(event="resume", step=client["step"], tag=tag)
    return int(client["step"]), list(client["history"])


def save_model(engine: Any, tokenizer: PreTrainedTokenizerBase, s: TrainSettings, dist: Dist,
               metrics: dict[str, Any]) -> None:
    """The Hugging Face checkpoint (safetensors) and tokenizer, then ``metrics.json`` last, from rank 0."""
    if s.zero_stage == 3:  # collective: every rank sends its partitions, rank 0 receives the whole model
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.rank == 0 else None
    if dist.rank == 0:
        local = storage.parse(s.output)
        staging = (Path(tempfile.mkdtemp(dir=s.cache_dir, prefix="output-")) if local.scheme == "s3"
                   else Path(local.key))
        engine.module.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        metrics = {**metrics, "checkpoint_sha256": runtime.model_digest(staging)}  # the lineage's checkpoint identity
        if local.scheme == "s3":
            storage.upload_dir(staging, s.output)
            shutil.rmtree(staging)
        storage.write_bytes(storage.join(s.output, runtime.METRICS_FILE), json.dumps(metrics, indent=2).encode())
        runtime.log(event="saved", uri=s.output)
    barrier()


# --- The loop ------------------------------------------------------------------------------------------------


def train(s: TrainSettings) -> int:
    dist = init_distributed()
    if storage.exists(storage.join(s.output, runtime.METRICS_FILE)):
        if dist.rank == 0:
            runtime.log(event="skip", reason="output already complete", uri=s.output)
        return 0

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from spin_k8s.workers.loss import spin_loss

    s.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = runtime.fetch_model(s.model, s.cache_dir)
    tokenizer = runtime.load_tokenizer(model_dir, s.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref_digest = runtime.model_digest(model_dir)
    sets = data.mix(s.iteration, s.keep_previous, s.synthetic)
    pairs = load_pairs(sets, tokenizer, s, ref_digest, held_out=False if s.holdout_fraction else None)
    if s.eval_data:
        eval_pairs = load_pairs([s.eval_data], tokenizer, s, ref_digest)
    elif s.holdout_fraction:  # the newest opponent's answers to prompts no iteration trains on
        eval_pairs = load_pairs(sets[-1:], tokenizer, s, ref_digest, held_out=True)
    else:
        eval_pairs = []
    global_batch = s.micro_batch_size * s.gradient_accumulation_steps * dist.world_size
    if len(pairs) < global_batch:
        raise data.DataError(f"{len(pairs)} pairs cannot fill one global batch of {global_batch} "
                             f"(micro batch x accumulation x world size)")
    per_epoch = len(pairs) // global_batch
    steps, schedule = schedule_steps(s, per_epoch)
    lengths = [p.length for p in pairs]
    window = batching.GROUP_WINDOW if s.length_grouping else 1
    epoch_batches = functools.lru_cache(maxsize=1)(
        lambda epoch: batching.epoch_batches(lengths, global_batch, s.seed, epoch, window))

    ds_config = deepspeed_config(s, dist.world_size, node_local_checkpoints=storage.is_s3(s.checkpoint_dir or ""))
    compute_dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    ref_model = None
    if s.reference == "live":  # loaded before ZeRO-3 is announced to transformers: it must stay whole
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype).requires_grad_(False)
    # Kept alive while the policy loads: under ZeRO-3 it makes from_pretrained partition weights as it loads.
    zero3_loading = HfDeepSpeedConfig(ds_config) if s.zero_stage == 3 else None  # type: ignore[no-untyped-call]
    model, dropout = load_policy(model_dir, compute_dtype)
    loaded_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer_class = torch.optim.RMSprop if s.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=s.learning_rate, weight_decay=0.0)
    warmup = math.ceil(s.warmup_ratio * schedule)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: linear_schedule(k, schedule, warmup)))
    if ref_model is not None:
        ref_model.to(engine.device)
    with torch.no_grad():
        plain_head = head_gives_the_logits(engine, batching.collate(pairs[:1], pad_id).to(engine.device))
    if s.logits_chunk_tokens and not plain_head:
        s = replace(s, logits_chunk_tokens=0)
        if dist.rank == 0:
            runtime.log(event="logits_whole", reason="the model's logits are not its LM head's output (a soft-cap "
                        "or a scale in its forward): log-probs are computed from its whole logits")

    # Reference log-probs: the shards' are checked on a sample and dropped if they disagree with the trainer's
    # own forward; the missing ones come from one pass of the policy, which has not moved yet: the reference.
    if s.reference == "live":
        pairs = [replace(p, ref_real=None, ref_generated=None) for p in pairs]
    everything = [*pairs, *eval_pairs]
    engine.eval()
    check = check_reference(engine, everything, s, dist, pad_id, engine.device)
    if check is not None and dist.rank == 0:
        runtime.log(event="reference_check", **check)
    if check is not None and check["fallback"]:
        if dist.rank == 0:
            runtime.log(event="reference_fallback", pairs=len(everything),
                        reason=f"mean beta-scaled margin difference {check['beta_margin_abs_diff/mean']:.4g} > "
                               f"--reference-tolerance {s.reference_tolerance}: the trainer scores every pair itself")
        everything = [replace(p, ref_real=None, ref_generated=None) for p in everything]
    todo = [i for i, p in enumerate(everything) if p.ref_real is None and (s.reference != "live" or i >= len(pairs))]
    ref_counts = {"precomputed": sum(p.ref_real is not None for p in everything[:len(pairs)]),
                  "live": len(pairs) if s.reference == "live" else 0, "first_pass": sum(i < len(pairs) for i in todo)}
    if todo:
        everything = with_reference(everything, score_pairs(engine, everything, todo, dist, s, pad_id,
                                                            engine.device))
    engine.train()
    pairs, eval_pairs = everything[:len(pairs)], everything[len(pairs):]

    start, history = restore(engine, s, dist)
    if dist.rank == 0:
        # Under ZeRO-3 a parameter's data is only this rank's partition; ds_numel is the whole size.
        params = list(engine.module.parameters())
        runtime.log(event="start", pairs=len(pairs), eval_pairs=len(eval_pairs), steps=steps, schedule_steps=schedule,
                    warmup_steps=warmup, first_step=start + 1, dropout_disabled=dropout, loaded_dtype=loaded_dtype,
                    global_batch=global_batch, world_size=dist.world_size, zero_stage=s.zero_stage,
                    parameters=sum(getattr(p, "ds_numel", p.numel()) for p in params),
                    parameters_on_rank=sum(getattr(p, "ds_tensor", p).numel() for p in params))
    engine.train()
    for step in range(start, steps):
        began = time.monotonic()
        lr = float(engine.get_lr()[0])
        # loss, real reward, generated reward, correct pairs, pairs, tokens: summed over micro-batches and ranks,
        # on the device, so that logging costs no synchronisation before the step's end
        sums = torch.zeros(6, dtype=torch.float64, device=engine.device)
        epoch, index = divmod(step, per_epoch)
        indices = epoch_batches(epoch)[index]
        for chunk in batching.micro_batches(indices, lengths, s.micro_batch_size, dist.world_size, dist.rank):
            batch = batching.collate([pairs[i] for i in chunk], pad_id).to(engine.device)
            b = len(chunk)
            logps = batch_logps(engine, batch, s.logits_chunk_tokens)  # (2B,) real rows first
            if ref_model is not None:
                with torch.no_grad():
                    ref = batch_logps(ref_model, batch, s.logits_chunk_tokens)  # (2B,)
            else:
                assert batch.ref_logps is not None
                ref = batch.ref_logps
            losses, real, generated = spin_loss(logps[:b], logps[b:], ref[:b], ref[b:], s.beta, s.loss_type)
            engine.backward(losses.mean())
            engine.step()  # an optimizer step at the accumulation boundary, else gradient accumulation
            sums += torch.stack([losses.detach().sum(), real.sum(), generated.sum(), (real > generated).sum(),
                                 torch.tensor(b, device=engine.device),
                                 torch.tensor(batch.tokens, device=engine.device)]).double()
        torch.distributed.all_reduce(sums)
        seconds = time.monotonic() - began
        loss, real_reward, generated_reward, correct, n, tokens = sums.tolist()
        metrics = {"step": step + 1, "loss": loss / n, "rewards/real": real_reward / n,
                   "rewards/generated": generated_reward / n, "rewards/margins": (real_reward - generated_reward) / n,
                   "rewards/accuracies": correct / n, "lr": lr, "tokens": tokens, "seconds": seconds,
                   "tokens/s": tokens / seconds}
        history.append(metrics)
        if dist.rank == 0:
            runtime.log(event="step", **metrics)
        if s.checkpoint_dir and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(engine, s, dist, step + 1, history)

    summary: dict[str, Any] = {
        "iteration": s.iteration, "steps": steps, "schedule_steps": schedule, "pairs": len(pairs),
        "global_batch": global_batch, "dropout_disabled": dropout,
        "world_size": dist.world_size, "reference": ref_counts, "reference_check": check,
        "final": history[-1] if history else {},
        "tokens/s": sum(h["tokens"] for h in history) / max(sum(h["seconds"] for h in history), 1e-9),
        "eval": evaluate(engine, eval_pairs, s, dist, pad_id) if eval_pairs else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "history": history,
    }
    if dist.rank == 0 and summary["eval"]:
        runtime.log(event="eval", **summary["eval"])
    save_model(engine, tokenizer, s, dist, summary)
    del zero3_loading
    return 0


# --- The command line ----------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spin_k8s.workers.train",
        description="Train one SPIN iteration (real vs synthetic responses) with DeepSpeed; run under torchrun.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchrun --nproc-per-node 8 -m spin_k8s.workers.train --model s3://b/run/iter-1/model \\\n"
               "    --synthetic 0=s3://b/run/iter-0/synthetic --synthetic 1=s3://b/run/iter-1/synthetic \\\n"
               "    --iteration 1 --output s3://b/run/iter-2/model --checkpoint-dir s3://b/run/iter-1/ckpt\n"
               "exit codes: 0 done or already done, 2 bad usage or unusable data, other: retry",
    )
    a = p.add_argument
    a("--model", required=True, help="the iteration's starting model (policy init and reference): local "
      "directory or s3:// prefix (example: s3://spin/demo/iter-0/model)")
    a("--synthetic", action="append", default=[], metavar="ITERATION=URI", required=True,
      help="a synthetic set (generation output prefix) and its iteration; repeat for each available one "
      "(example: --synthetic 0=s3://spin/demo/iter-0/synthetic)")
    a("--iteration", type=int, default=0, help="this SPIN iteration (default 0; example: 2)")
    a("--keep-previous", type=int, default=1, help="previous iterations' synthetic sets mixed in "
      "(default 1, as in the paper; example: 2)")
    a("--output", required=True, help="prefix for the trained model, tokenizer and metrics.json "
      "(example: s3://spin/demo/iter-1/model)")
    a("--eval-data", default=None, help="held-out synthetic set: reward accuracy after training goes into "
      "metrics.json (default none; example: s3://spin/demo/iter-0/heldout)")
    a("--holdout-fraction", type=float, default=0.0, help="share of prompts (chosen by id, the same in every "
      "iteration) kept out of training and evaluated after it: the early-stop signal (default 0; example: 0.1)")
    a("--checkpoint-dir", default=None, help="DeepSpeed checkpoints, resumed from automatically: a path all "
      "nodes share or an s3:// prefix (default none; example: s3://spin/demo/iter-0/checkpoints)")
    a("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints, 0 = never "
      "(default 0; example: 200)")
    a("--checkpoints-to-keep", type=int, default=2, help="newest checkpoints kept, locally and in storage; older "
      "ones are deleted once a newer one and its 'latest' marker are written (default 2; example: 1)")
    a("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3,
      help="DeepSpeed ZeRO stage (default 3, as in the paper; example: 2)")
    a("--precision", choices=("bf16", "fp32"), default="bf16", help="training precision (default bf16; example: fp32)")
    a("--optimizer", choices=("rmsprop", "adamw"), default="rmsprop",
      help="torch optimizer (default rmsprop, as in the paper; example: adamw)")
    a("--learning-rate", type=float, default=5e-7, help="peak learning rate (default 5e-7; example: 1e-7)")
    a("--beta", type=float, default=0.1, help="SPIN beta (default 0.1; example: 5.0)")
    a("--loss-type", choices=LOSS_TYPES, default="sigmoid", help="SPIN loss (default sigmoid; example: hinge)")
    a("--warmup-ratio", type=float, default=0.1, help="share of the schedule's steps warming up linearly, then "
      "linear decay to 0 (default 0.1; example: 0)")
    a("--epochs", type=int, default=2, help="passes over the pairs: where training stops (default 2, as in the "
      "paper; example: 3)")
    a("--schedule-epochs", type=int, default=0, help="epochs the learning-rate schedule spans, at least --epochs: "
      "training stops before the learning rate reaches 0; 0 = --epochs (default 0; the authors' scripts: 6)")
    a("--max-steps", type=int, default=0, help="optimizer steps, overriding --epochs (and the schedule's length "
      "unless --schedule-epochs); 0 = from epochs (default 0; example: 500)")
    a("--length-grouping", action=argparse.BooleanOptionalAction, default=True, help="cut padding: each run of "
      f"{batching.GROUP_WINDOW} global batches is formed from pairs of similar length, then the batches are "
      "shuffled; off: plain random batches, as the authors (default on; example: --no-length-grouping)")
    a("--micro-batch-size", type=int, default=8, help="pairs per process per forward (default 8; example: 4)")
    a("--logits-chunk-tokens", type=int, default=LOGITS_CHUNK_TOKENS, help="response tokens projected to the "
      "vocabulary at a time: their fp32 logits (tokens x vocabulary x 4 bytes) are the most that exist at once; "
      "0 = the model's whole logits, as does a model whose logits are not its LM head's output "
      f"(default {LOGITS_CHUNK_TOKENS}; example: 256 for a 256k vocabulary)")
    a("--gradient-accumulation-steps", type=int, default=1,
      help="micro-batches per optimizer step (default 1; example: 4)")
    a("--max-length", type=int, default=1024, help="prompt + response tokens (default 1024; example: 2048)")
    a("--max-prompt-length", type=int, default=512, help="prompt tokens, kept from the end (default 512; example: 256)")
    runtime.add_template_flags(p)
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default 1.0; example: 0)")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
      help="recompute activations in backward to save memory (default on; example: --no-gradient-checkpointing)")
    a("--reference", choices=("precomputed", "live"), default="precomputed",
      help="reference log-probs: precomputed = from the shards where the opponent scored them, the rest in one "
      "pass before training; live = a frozen model copy every step (default precomputed; example: live)")
    a("--reference-check-pairs", type=int, default=256, help="pairs whose shard reference log-probs are rescored "
      "by the trainer before step 0 and compared (seeded sample; all if fewer); 0 = trust the shards unchecked "
      "(default 256; example: 1024)")
    a("--reference-tolerance", type=float, default=0.05, help="largest mean, over the checked pairs, of "
      "beta * |shard margin - trainer margin| (margin: real minus generated summed log-prob) in units of the "
      "loss's logit; above it the trainer recomputes every reference log-prob. 0.05 moves a pair's step-0 loss "
      "weight by about a hundredth: fp32 engines pass by far, bf16 ones pass at small beta and short answers "
      "and fail at the paper's beta 5.0 (default 0.05; example: 0.2)")
    a("--seed", type=int, default=42, help="data order seed (default 42; example: 7)")
    a("--cache-dir", type=Path, default=None, help="local cache for models and checkpoint staging "
      "(default $SPIN_CACHE_DIR or /tmp/spin-cache; example: /cache)")
    return p


def settings_from_args(argv: Sequence[str] | None) -> TrainSettings:
    args = parser().parse_args(argv)
    numbers = (args.micro_batch_size, args.gradient_accumulation_steps, args.epochs or args.max_steps)
    counts = (args.max_steps, args.checkpoint_every, args.keep_previous, args.schedule_epochs, args.logits_chunk_tokens)
    if min(numbers) < 1 or min(counts) < 0:
        raise runtime.UsageError("batch sizes, accumulation and epochs/steps must be >= 1; counts >= 0")
    if args.schedule_epochs and not args.max_steps and args.schedule_epochs < args.epochs:
        raise runtime.UsageError("need --schedule-epochs >= --epochs: the schedule cannot end before training")
    if args.max_prompt_length < 1 or args.max_length <= args.max_prompt_length:
        raise runtime.UsageError("need --max-length > --max-prompt-length >= 1")
    if not 0 <= args.warmup_ratio < 1 or args.learning_rate <= 0 or args.beta <= 0:
        raise runtime.UsageError("need 0 <= --warmup-ratio < 1, --learning-rate > 0 and --beta > 0")
    if not 0 <= args.holdout_fraction < 1:
        raise runtime.UsageError("need 0 <= --holdout-fraction < 1")
    if args.reference_check_pairs < 0 or args.reference_tolerance < 0:
        raise runtime.UsageError("need --reference-check-pairs >= 0 and --reference-tolerance >= 0")
    if args.checkpoints_to_keep < 1:
        raise runtime.UsageError("need --checkpoints-to-keep >= 1: a restart resumes from the newest")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise runtime.UsageError("--checkpoint-every needs --checkpoint-dir")
    template = runtime.template_from_args(args)
    try:
        synthetic = data.parse_assignments(args.synthetic)
    except data.DataError as exc:  # a malformed flag: bad usage, not bad data
        raise runtime.UsageError(str(exc)) from exc
    return TrainSettings(
        model=args.model, synthetic=synthetic, iteration=args.iteration,
        keep_previous=args.keep_previous, output=args.output, eval_data=args.eval_data,
        holdout_fraction=args.holdout_fraction,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        checkpoints_to_keep=args.checkpoints_to_keep, zero_stage=args.zero_stage,
        precision=args.precision, optimizer=args.optimizer, learning_rate=args.learning_rate, beta=args.beta,
        loss_type=args.loss_type, warmup_ratio=args.warmup_ratio, epochs=args.epochs,
        schedule_epochs=args.schedule_epochs, max_steps=args.max_steps, length_grouping=args.length_grouping,
        micro_batch_size=args.micro_batch_size, logits_chunk_tokens=args.logits_chunk_tokens,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        max_response_length=runtime.response_cap_from_args(args), prompt_format=template.format,
        system_prompt=template.system_prompt, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, reference=args.reference,
        reference_check_pairs=args.reference_check_pairs, reference_tolerance=args.reference_tolerance, seed=args.seed,
        cache_dir=args.cache_dir or runtime.default_cache_dir(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    code = runtime.run_cli(lambda: train(settings_from_args(argv)))
    with contextlib.suppress(Exception):
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
