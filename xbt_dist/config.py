"""Typed, validated run configuration: one dataclass per component, loaded from YAML recipes.

A recipe is a YAML file whose top-level keys are the fields of `RunConfig`. Unknown keys and bad
values fail at load time with the dotted field name (`train.lr`), the bad value and a hint, so a
typo in a 500-GPU-hour job fails in the first second instead of being silently ignored.
Overrides use the same dotted names: `--set train.lr=3e-4 dist.workers=2`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and the fix.

    `key` is the dotted field name when the error is about one (`train.lr`): `load_config` uses it
    to prefix the message with the recipe's `file:line:column` of that key.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _check(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}", key=name)


MODEL_BACKENDS = ("open_clip", "hf_blip")


@dataclass
class ModelRef:
    """Which dual encoder: backend, architecture name plus pretrained tag, checkpoint or directory.

    backend `open_clip` (default): `arch` an open_clip architecture, `pretrained` a tag or a state-dict
    file. backend `hf_blip` (transformers BlipForImageTextRetrieval, docs/architecture.md "Encoder
    backends"): `arch` a shipped architecture name (`blip-itm-base-coco`, `blip-itm-large-coco`), a
    config.json or a directory holding one; `pretrained` a local `save_pretrained` directory (weights,
    config and tokenizer), None = random init.
    """
    arch: str
    pretrained: str | None = None   # open_clip tag ("openai") or a local checkpoint path; None = random init
    config_dir: str | None = None   # directory of extra open_clip JSON architecture configs
    # Build the towers with QuickGELU (what OpenAI's CLIP weights were trained with). None: as the
    # open_clip pretrained registry says for (arch, tag) (true for every `openai` tag), else the
    # architecture's own setting. A local checkpoint cannot tell: set true for OpenAI weights on disk.
    quick_gelu: bool | None = None
    backend: str = "open_clip"      # open_clip | hf_blip
    # Text tokens per caption for Hugging Face backends (None: the backend's default, 35 for BLIP as in
    # its retrieval fine-tuning); open_clip models fix it in their architecture.
    context_length: int | None = None

    def __post_init__(self):
        _check(isinstance(self.arch, str) and bool(self.arch), "model.arch", self.arch,
               "an open_clip architecture name such as 'ViT-B-32'")
        _check(self.quick_gelu in (None, True, False), "model.quick_gelu", self.quick_gelu,
               "true, false or null (from the pretrained tag)")
        _check(self.backend in MODEL_BACKENDS, "model.backend", self.backend,
               f"one of {', '.join(MODEL_BACKENDS)}")
        _check(self.context_length is None or (isinstance(self.context_length, int)
                                               and not isinstance(self.context_length, bool)
                                               and 4 <= self.context_length <= 512),
               "model.context_length", self.context_length, "null or an int in 4..512")
        _check(self.context_length is None or self.backend != "open_clip", "model.context_length",
               self.context_length, "null with backend open_clip (its architecture fixes the context length)")


_TOWERS = ("image", "text")
_LORA_TARGETS = ("attn", "mlp")


@dataclass
class AdapterConfig:
    """What XBT adds to (and trains in) the new model."""
    lora_rank: int = 8                              # LoRA rank r (0 = no LoRA)
    lora_alpha: float = 16                          # LoRA scaling is alpha / r
    lora_dropout: float = 0.0                       # dropout on LoRA inputs (MLP targets only, see below)
    lora_targets: tuple[str, ...] = ("attn",)       # "attn" = q,k,v,out of attention; "mlp" = c_fc, c_proj
    text_prompts: int = 4                           # CoOp soft prompt tokens after the start token
    visual_prompts: int = 4                         # VPT-shallow prompt tokens after the class token
    tune_layernorm: bool = True                     # train LayerNorm affine parameters (as deltas)
    towers: tuple[str, ...] = ("image", "text")     # towers that get LoRA and LN tuning
    full_tune: bool = False                         # paper's Full-tune baseline: no adapters, all weights train

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        self.towers = tuple(self.towers)
        for name in ("lora_rank", "text_prompts", "visual_prompts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"AdapterConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"AdapterConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"AdapterConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        bad = [t for t in self.lora_targets if t not in _LORA_TARGETS]
        if bad:
            raise ValueError(f"AdapterConfig.lora_targets: unknown {bad}; choose from {list(_LORA_TARGETS)}")
        bad = [t for t in self.towers if t not in _TOWERS]
        if bad or not self.towers:
            raise ValueError(f"AdapterConfig.towers must be a non-empty subset of {list(_TOWERS)}, got "
                             f"{list(self.towers)}")
        if self.lora_dropout > 0 and "attn" in self.lora_targets:
            # Attention LoRA is applied as a weight delta (see LoraMultiheadAttention): no input dropout.
            warnings.warn("AdapterConfig.lora_dropout applies to MLP LoRA only; attention LoRA runs without it")


@dataclass
class PhiConfig:
    """Shape of the projection phi: new embedding space -> old."""
    hidden: int = 2048              # hidden width (paper: 2048)
    depth: int = 3                  # number of Linear layers (paper: 3 -> 6.82M params for 768->512)

    def __post_init__(self):
        _check(self.hidden > 0, "phi.hidden", self.hidden, "a positive int")
        _check(self.depth >= 1, "phi.depth", self.depth, "an int >= 1")


@dataclass
class LossConfig:
    """Weights of the InfoNCE terms (0 switches a term off) and the temperature."""
    image_to_old_text: float = 1.0   # L(phi(v_bar), w_old): image query vs old text gallery
    text_to_old_image: float = 1.0   # L(phi(w_bar), v_old): text query vs old image gallery
    new_new: float = 1.0             # L(phi(v_bar), phi(w_bar)): keeps new-to-new alignment
    text_to_old_text: float = 0.0    # L(phi(w_bar), w_old): intra-modal, off by default
    image_to_old_image: float = 0.0  # L(phi(v_bar), v_old): intra-modal, off by default
    temperature: float = 0.07        # initial softmax temperature
    learn_temperature: bool = True   # train log(1/temperature) like CLIP's logit_scale

    def __post_init__(self):
        for name in self.weights():
            _check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), "a weight >= 0")
        _check(self.temperature > 0, "loss.temperature", self.temperature, "a float > 0")

    def weights(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("image_to_old_text", "text_to_old_image", "new_new",
                                              "text_to_old_text", "image_to_old_image")}


@dataclass
class OptimConfig:
    """Optimiser and schedule (AdamW, linear warmup then cosine)."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    grad_accum: int = 1              # micro-batches per optimiser step

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", self.lr, "a float > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a float >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an int >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "a float >= 0")
        _check(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, "an int >= 1")


@dataclass
class Stage1Config:
    """Stage 1: text-only pretraining of phi."""
    source: str = "embeddings"       # "embeddings": precomputed (w_new, w_old) shards; "text": run both text encoders
    text_shards: str | None = None   # text shard set (source="text", or input of `xbt embed`)
    embeddings: str | None = None    # embedding shard set with text_new/text_old (source="embeddings")
    epochs: float = 3.0
    batch_size: int = 512            # global batch size
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    temperature: float = 0.05
    # DataLoader processes per rank reading the shards. None: 1 for source=text (tar reading
    # overlaps the text towers: 1.33x -> 1.01x the plain loop's step time), 0 for precomputed
    # embeddings (numpy batches cost less in-process than shipping them from a worker).
    num_workers: int | None = None
    # None: the value of train.<same name>, what stage 1 read before it had its own keys
    # (deprecated, with a warning when that value is not the default; `stage1_setting`).
    seed: int | None = None
    checkpoint_every: int | None = None  # optimiser steps between checkpoints (0: only at the end)
    log_every: int | None = None

    def __post_init__(self):
        _check(self.source in ("embeddings", "text"), "stage1.source", self.source, "'embeddings' or 'text'")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 0, "stage1.checkpoint_every",
               self.checkpoint_every, "an int >= 0, or null for train.checkpoint_every")
        _check(self.log_every is None or self.log_every >= 1, "stage1.log_every", self.log_every,
               "an int >= 1, or null for train.log_every")
        _check(self.num_workers is None or self.num_workers >= 0, "stage1.num_workers",
               self.num_workers, "an int >= 0, or null for the default")
        _check(self.epochs > 0, "stage1.epochs", self.epochs, "a number > 0")
        _check(self.batch_size > 0, "stage1.batch_size", self.batch_size, "a positive int")


PRECISIONS = ("fp32", "bf16", "fp16")
FP16_REFUSED = ("dist.precision='fp16' is not supported: fp16 needs dynamic loss scaling, which this trainer "
                "does not apply (its trainables stay fp32 under autocast, and DeepSpeed's fp16 mode would cast "
                "every weight to fp16). Fix: use dist.precision=bf16 (fp32's range, no loss scaling; GPUs "
                "since NVIDIA Ampere, and CPUs) or fp32.")
# xbt and the paper's Table 6 baselines, then the ablations that were named base/lora_only/full_tune
# before this project adopted the paper's names (xbt_dist/train/model.py:resolve_method says what each trains and from where).
METHODS = ("xbt", "lora_only", "base", "full_tune", "xbt_old_online", "lora_only_stored", "full_tune_stage1")
TARGET_SOURCES = ("precomputed", "old_model", "synthetic")


@dataclass
class TrainConfig:
    """Stage 2 (XBT) training."""
    method: str = "xbt"              # one of METHODS (paper Table 6 rows + ablations)
    target_source: str = "precomputed"  # precomputed | old_model | synthetic (docs/architecture.md, "Target sources")
    train_shards: str | None = None  # image-text shard set
    targets: str | None = None       # embedding shard set with image_old/text_old (precomputed)
    phi_init: str = "stage1"         # "stage1": start from the stage-1 phi; "random"
    epochs: float = 2.0
    max_steps: int = 0               # stop after this many optimiser steps (0: use epochs)
    batch_size: int = 128            # global batch size (split over workers)
    num_workers: int = 1             # DataLoader workers per training worker
    shuffle_buffer: int = 1000
    resampled: bool = False          # LAION-style: draw shards with replacement, endless stream
    samples_per_epoch: int = 0       # with resampled=True: samples that make one epoch
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    checkpoint_every: int = 0        # optimiser steps between checkpoints (0: only at the end)
    log_every: int = 10

    def __post_init__(self):
        _check(self.method in METHODS, "train.method", self.method, f"one of {METHODS}")
        _check(self.target_source in TARGET_SOURCES, "train.target_source", self.target_source,
               f"one of {TARGET_SOURCES}")
        _check(self.phi_init in ("stage1", "random"), "train.phi_init", self.phi_init, "'stage1' or 'random'")
        _check(self.epochs > 0, "train.epochs", self.epochs, "a number > 0")
        _check(self.batch_size > 0, "train.batch_size", self.batch_size, "a positive int")
        _check(self.max_steps >= 0, "train.max_steps", self.max_steps, "an int >= 0")
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, "an int >= 0")


@dataclass
class DataConfig:
    """Bad and missing training data (data/stream.py, data/reader.py)."""
    # Stop the stage once more than this fraction of an epoch's samples was skipped (bad samples,
    # missing or unreadable shards, missing embedding files or keys), naming the files; below it
    # they are skipped and counted. 1.0 never stops.
    max_bad_fraction: float = 0.05
    read_retries: int = 3            # retries of a transient read error (OSError), backoff 0.5 s x 2^k

    def __post_init__(self):
        _check(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", self.max_bad_fraction,
               "a fraction in [0, 1] (1 = never stop)")
        _check(self.read_retries >= 0, "data.read_retries", self.read_retries, "an int >= 0")


@dataclass
class DistConfig:
    """How the stage runs: Ray Train workers, each wrapping the model in DeepSpeed."""
    backend: str = "local"           # "local": this process, plain PyTorch; "ray": Ray Train + DeepSpeed
    workers: int = 1                 # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    ray_address: str | None = None   # attach to this Ray cluster ("auto", "ip:port"); None: RAY_ADDRESS or local
    zero_stage: int = 0              # DeepSpeed ZeRO stage 0-3
    deepspeed_config: str | None = None  # a DeepSpeed JSON (cluster/deepspeed/); batch sizes are filled in
    activation_checkpointing: bool = False  # recompute frozen tower activations in backward
    max_failures: int = 0            # Ray FailureConfig: restarts from the latest checkpoint
    # Seconds between metric reports to Ray (dashboard, Result.metrics). Ray Train v2 blocks a report
    # until its controller has taken the previous one (it polls every 2 s), so reporting at every
    # log point throttled the toy phi run 5x; the progress line and TensorBoard still log every point.
    report_every_s: float = 30.0
    # Forward precision (xbt_dist.train.precision): "fp32" | "bf16" (autocast forward; fp32 weights,
    # optimiser, logits and loss) | "fp16" (refused: needs loss scaling). null: bf16 on a GPU, fp32 on CPU.
    precision: str | None = None

    def __post_init__(self):
        _check(self.backend in ("local", "ray"), "dist.backend", self.backend, "'local' or 'ray'")
        _check(self.precision in (None,) + PRECISIONS, "dist.precision", self.precision,
               f"one of {PRECISIONS}, or null for the device default (bf16 on GPU, fp32 on CPU)")
        if self.precision == "fp16":
            raise ConfigError(FP16_REFUSED, key="dist.precision")
        _check(self.workers >= 1, "dist.workers", self.workers, "an int >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "dist.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _check(self.report_every_s >= 0, "dist.report_every_s", self.report_every_s, "seconds >= 0")


@dataclass
class EvalConfig:
    """Evaluation sets and metrics."""
    eval_shards: str | None = None   # multi-caption eval shard set: the TEST gallery that results report
    val_shards: str | None = None    # validation gallery (same form, disjoint): `xbt eval --split val`
    zeroshot_shards: str | None = None
    ks: tuple[int, ...] = (1, 5, 10, 50)
    # Zero-shot class prompts: "single" = the paper's one prompt "a photo of a {}."; "ensemble" = the
    # mean over the zero-shot set's classes.json templates (CLIP's prompt ensembling).
    zeroshot_prompts: str = "single"
    criterion_ks: tuple[int, ...] = (1, 5)  # Recall@K that must satisfy XBT/old >= old/old
    batch_size: int = 256
    tsne_points: int = 300
    num_workers: int = 2              # DataLoader decode workers streaming the eval sets (0: inline)
    progress_every: int = 50          # a progress line every N embedded batches (0: none)
    chunk_size: int | None = None     # query rows per ranking chunk (null: a fixed score budget)
    rank_device: str = "auto"         # where similarity/ranking run: auto (GPU when there), cpu, cuda
    embed_dtype: str = "float32"      # kept embeddings: float32 (today's numbers) or float16 (half)

    def __post_init__(self):
        _check(self.batch_size > 0, "eval.batch_size", self.batch_size, "a positive int")
        _check(self.zeroshot_prompts in ("single", "ensemble"), "eval.zeroshot_prompts", self.zeroshot_prompts,
               "'single' (the paper's \"a photo of a {}.\") or 'ensemble' (classes.json templates)")
        _check(self.num_workers >= 0, "eval.num_workers", self.num_workers, "an int >= 0")
        _check(self.progress_every >= 0, "eval.progress_every", self.progress_every, "an int >= 0")
        _check(self.chunk_size is None or self.chunk_size > 0, "eval.chunk_size", self.chunk_size,
               "a positive int, or null for the default budget")
        _check(self.rank_device in ("auto", "cpu") or self.rank_device.startswith("cuda"),
               "eval.rank_device", self.rank_device, "'auto', 'cpu' or 'cuda[:N]'")
        _check(self.embed_dtype in ("float16", "float32"), "eval.embed_dtype", self.embed_dtype,
               "'float16' or 'float32'")


@dataclass
class LogConfig:
    """Experiment trackers next to the progress line and TensorBoard (xbt_dist.train.tracking).

    Off by default. Rank 0 logs every log point's metrics (the progress line's numbers, under
    TensorBoard's names) and the whole run config; a resumed stage continues the same run.
    """
    wandb: bool = False              # Weights & Biases (pip install wandb)
    wandb_project: str = "xbt"
    wandb_entity: str | None = None  # team/user; null: the API key's default
    wandb_mode: str | None = None    # "online" | "offline" (files for `wandb sync`) | "disabled"; null: $WANDB_MODE
    mlflow: bool = False             # MLflow (pip install mlflow-skinny)
    mlflow_tracking_uri: str | None = None  # http://server, sqlite:///file.db, file:///dir; null: $MLFLOW_TRACKING_URI
    mlflow_experiment: str = "xbt"

    def __post_init__(self):
        _check(self.wandb_mode in (None, "online", "offline", "disabled"), "log.wandb_mode",
               self.wandb_mode, "'online', 'offline', 'disabled' or null ($WANDB_MODE)")
        _check(bool(self.wandb_project), "log.wandb_project", self.wandb_project, "a project name")
        _check(bool(self.mlflow_experiment), "log.mlflow_experiment", self.mlflow_experiment,
               "an experiment name")


INDEX_TYPES = ("flat", "ivfpq", "hnsw")
GALLERY_VIEWS = ("old", "new", "xbt")


@dataclass
class IndexConfig:
    """Old-gallery ANN indexes (`xbt index build/eval`, read by `xbt serve`); FAISS, inner product."""
    gallery_shards: str | None = None  # image-text shard set of the gallery (default: eval.eval_shards)
    old_embeddings: str | None = None  # existing image_old/text_old set of that gallery (else embedded once)
    query_shards: str | None = None    # multi-caption queries of `xbt index eval` (default: eval.eval_shards)
    dir: str | None = None           # output directory (default: <out_dir>/index)
    views: tuple[str, ...] = ("old", "new", "xbt")  # galleries to index; old is the one that ships
    types: tuple[str, ...] = ("flat", "ivfpq", "hnsw")
    ivf_nlist: int = 0               # IVF lists; 0: 4*sqrt(n), clipped so each list trains on >= 39 points
    pq_m: int = 8                    # PQ sub-quantisers (must divide d); 8 x 8 bits = 8 B per vector
    pq_bits: int = 8                 # bits per sub-quantiser code (lowered for galleries < 2**bits * 39)
    nprobe: int = 16                 # IVF lists visited per query
    hnsw_m: int = 32                 # HNSW links per node
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    ks: tuple[int, ...] = (1, 5, 10)  # Recall@K of `xbt index eval`; the largest K is the search depth
    use_gpu: bool = False            # move indexes to the GPU (needs a FAISS build with GPU support)
    batch_size: int = 256            # encoder batch for gallery embedding and eval queries

    def __post_init__(self):
        _check(set(self.types) <= set(INDEX_TYPES) and len(self.types) > 0, "index.types", self.types,
               f"a non-empty list of {INDEX_TYPES}")
        _check(set(self.views) <= set(GALLERY_VIEWS) and "old" in self.views, "index.views",
               self.views, f"a list of {GALLERY_VIEWS} that includes 'old'")
        _check(self.ivf_nlist >= 0, "index.ivf_nlist", self.ivf_nlist, "an int >= 0 (0: automatic)")
        _check(self.pq_m >= 1, "index.pq_m", self.pq_m, "an int >= 1 that divides the embedding dim")
        _check(1 <= self.pq_bits <= 16, "index.pq_bits", self.pq_bits, "an int in [1, 16]")
        _check(self.nprobe >= 1, "index.nprobe", self.nprobe, "an int >= 1")
        _check(self.hnsw_m >= 2, "index.hnsw_m", self.hnsw_m, "an int >= 2")
        _check(self.hnsw_ef_construction >= 1, "index.hnsw_ef_construction",
               self.hnsw_ef_construction, "an int >= 1")
        _check(self.hnsw_ef_search >= 1, "index.hnsw_ef_search", self.hnsw_ef_search, "an int >= 1")
        _check(len(self.ks) > 0 and min(self.ks) >= 1, "index.ks", self.ks, "a list of ints >= 1")
        _check(self.batch_size >= 1, "index.batch_size", self.batch_size, "an int >= 1")


@dataclass
class ServeConfig:
    """`xbt serve`: the query service over the old-gallery index."""
    host: str = "127.0.0.1"
    port: int = 8080
    index_type: str = "hnsw"         # which built index answers (flat | ivfpq | hnsw)
    top_k: int = 10                  # results per query unless the request asks for fewer/more
    max_k: int = 100                 # largest k a request may ask for
    max_upload_bytes: int = 8 << 20  # image uploads above this get 413
    max_text_chars: int = 1000       # longer captions get 422
    max_batch: int = 256             # most queries in one request
    # torch intra-op threads of the service (0: leave torch's default). 1 by default: a batch-1
    # query is too small to split, and on a loaded 2-core box 2 threads made the toy XBT text
    # encoder 23 ms -> 511 ms per query (threads spinning on each other).
    threads: int = 1

    def __post_init__(self):
        _check(self.index_type in INDEX_TYPES, "serve.index_type", self.index_type, f"one of {INDEX_TYPES}")
        _check(0 <= self.port < 65536, "serve.port", self.port, "a TCP port (0: any free port)")
        _check(1 <= self.top_k <= self.max_k, "serve.top_k", self.top_k, f"an int in [1, serve.max_k={self.max_k}]")
        _check(self.max_upload_bytes > 0, "serve.max_upload_bytes", self.max_upload_bytes, "bytes > 0")
        _check(self.max_text_chars > 0, "serve.max_text_chars", self.max_text_chars, "an int > 0")
        _check(self.max_batch >= 1, "serve.max_batch", self.max_batch, "an int >= 1")
        _check(self.threads >= 0, "serve.threads", self.threads, "an int >= 0 (0: torch default)")


@dataclass
class RunConfig:
    """A whole run: models, method, data, training, distribution, evaluation."""
    name: str = "run"
    out_dir: str = "runs/run"        # local path or fsspec URL; stage outputs go below it
    old: ModelRef = field(default_factory=lambda: ModelRef("ViT-B-32"))
    new: ModelRef = field(default_factory=lambda: ModelRef("ViT-L-14"))
    phi: PhiConfig = field(default_factory=PhiConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def stage_dir(self, stage: str) -> str:
        return f"{self.out_dir.rstrip('/')}/{stage}"


def stage1_setting(cfg: RunConfig, name: str, warn: bool = True) -> Any:
    """`stage1.<name>` (seed, checkpoint_every, log_every), else `train.<name>`.

    Stage 1 used to read these from `train`; a recipe that sets them there only still runs as
    before, and (with `warn`) says once per process that the keys moved when the value it falls
    back to is not the default."""
    value = getattr(cfg.stage1, name)
    if value is not None:
        return value
    value = getattr(cfg.train, name)
    if warn and value != getattr(TrainConfig(), name) and name not in _STAGE1_WARNED:
        _STAGE1_WARNED.add(name)
        warnings.warn(f"stage 1 uses train.{name}={value!r} because stage1.{name} is not set; stage 1 "
                      f"reading train.{name} is deprecated: set stage1.{name} in the recipe (or "
                      f"--set stage1.{name}={value})", FutureWarning, stacklevel=2)
    return value


_STAGE1_WARNED: set[str] = set()


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML value to the field's declared type, or fail naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, dict), name, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, name)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), name, value, "a list")
        return tuple(_coerce(v, args[0], name) for v in value)
    if tp is bool:
        _check(isinstance(value, bool), name, value, "true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an int")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, value, "a string")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict; unknown keys fail with a did-you-mean hint."""
    types = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            nested = [f"{n}.{key}" for n in names if dataclasses.is_dataclass(types[n])
                      and key in {f.name for f in dataclasses.fields(types[n])}]
            if nested:
                close = [f"{prefix}.{nested[0]}" if prefix else nested[0]]
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}", key=dotted)
        kwargs[key] = _coerce(value, types[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}", key=prefix or None) from e


def to_dict(cfg) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML: 3e-4, true, [1, 5], null)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem}); "
                              "quote lists and strings, e.g. adapters.lora_targets='[attn, mlp]'") from e
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string; users mean the number
                value = float(value)
            except ValueError:
                pass
        _set_dotted(data, key.strip(), value)
    return data



def with_fields(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A new RunConfig with typed `section.key` values set, validated as a recipe's are.

    For values that are already typed (command-line flags, paths a pipeline fills in): they are
    not turned into `--set` strings and re-parsed as YAML (which would read an address such as
    `[::1]:6379` as a list), and a bad one fails with the same ConfigError a bad `--set` gets,
    instead of being assigned past the checks. `cfg` itself is left as it was.
    """
    data = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(data, key, value)
    return from_dict(RunConfig, data)

# The shipped recipes, package data (in a checkout a symlink to the repository's configs/).
RECIPE_DIR = Path(__file__).resolve().parent / "configs"


def recipe_path(path: str | Path) -> Path:
    """`path` if it exists, else the shipped recipe it names (`toy.yaml`, `configs/toy.yaml`).

    The docs write `configs/NAME.yaml`, relative to the repository; from an installed wheel (or
    another directory) that name still means the recipe shipped with the package.
    """
    path = Path(path)
    if path.is_file() or path.is_absolute() or path.parent.name not in ("", "configs"):
        return path
    shipped = RECIPE_DIR / path.name
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (optionally with `base: other.yaml`) and apply dotted overrides.

    Errors are one line: a malformed recipe names `file:line:column` and the parser's problem; a
    bad key or value that came from a recipe (not from an override) is prefixed with the
    `file:line:column` of that key, in the recipe or the `base:` recipe that set it.
    """
    data: dict = {}
    marks: dict[str, str] = {}
    if path is not None:
        data = _read_yaml(recipe_path(path), marks)
    apply_overrides(data, overrides)
    # An overridden key's value no longer comes from the file: its errors get no file position.
    overridden = {item.split("=", 1)[0].strip() for item in overrides or []}
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        where = _locate(e.key, marks, overridden)
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}", key=e.key) from e


def _locate(key: str | None, marks: dict[str, str], overridden: set[str]) -> str | None:
    """`file:line:col` of the dotted key, or of its closest enclosing section that has one."""
    while key:
        if key in overridden:
            return None
        if key in marks:
            return marks[key]
        key = key.rpartition(".")[0]
    return None


def _mark(path: Path, mark) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}"  # yaml marks count from 0; editors from 1


def _parse(path: Path, marks: dict[str, str]) -> Any:
    """Parse one YAML file; record `file:line:col` of every mapping key by dotted name."""
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _mark(path, mark) if mark is not None else str(path)
        what = ": ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {what} (check the indentation, colons and quotes "
                          "there or on the line above)") from None
    except yaml.YAMLError as e:  # not tied to a position (e.g. bytes that are not UTF-8)
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()

    def walk(n, prefix: str) -> None:
        if not isinstance(n, yaml.MappingNode):
            return
        for k, v in n.value:
            if isinstance(k, yaml.ScalarNode):
                dotted = f"{prefix}.{k.value}" if prefix else k.value
                marks[dotted] = _mark(path, k.start_mark)
                walk(v, dotted)

    if node is not None:
        walk(node, "")
    return data


def _read_yaml(path: Path, marks: dict[str, str] | None = None) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (shipped recipes: "
                          f"{', '.join(sorted(p.name for p in RECIPE_DIR.glob('*.yaml')))}, e.g. configs/toy.yaml)")
    mine: dict[str, str] = {}
    data = _parse(path, mine) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1:1: a recipe must be a YAML mapping of RunConfig sections "
                          f"(name: ..., train: {{...}}), got a {type(data).__name__}")
    base = data.pop("base", None)
    mine.pop("base", None)
    if base:
        merged = _read_yaml((path.parent / base).resolve(), marks)
        _deep_update(merged, data)
        data = merged
    if marks is not None:
        marks.update(mine)  # this file's keys win over its base's, as its values do
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
