"""The job config: one pydantic model per section, `JobConfig` at the root.

Imports neither torch nor ray, so a config can be validated before anything heavy starts.
Every model forbids unknown keys; every field has a docstring (printed by `--help-config`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # Ray's strategies


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class TinyModelConfig(Section):
    hidden_size: int = Field(128, ge=8)
    """Width of the built-in tiny Qwen2 model."""
    num_layers: int = Field(2, ge=1)
    """Transformer layers."""
    num_heads: int = Field(4, ge=1)
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention); must divide num_heads."""
    intermediate_size: int = Field(256, ge=8)
    """MLP width."""
    max_position_embeddings: int = Field(128, ge=16)
    """Longest prompt + response the model can see."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}): "
                "change one of them"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        return self


class WarmStartConfig(Section):
    steps: int = Field(25, ge=0)
    """Supervised steps on the task before RL (built-in tiny model only); 0 skips it."""
    batch_size: int = Field(64, ge=1)
    """Examples per supervised step."""
    lr: float = Field(1e-3, gt=0)
    """Supervised learning rate."""


class ModelConfig(Section):
    path: str | None = None
    """HF model directory (config, weights, tokenizer). None builds the tiny built-in model."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the built-in model (used only when path is None)."""
    warm_start: WarmStartConfig = WarmStartConfig()
    """Short supervised warm start of the built-in model, so RL starts from a non-zero reward."""


class CurriculumConfig(Section):
    """Online difficulty filtering (asyncrl.data.curriculum): per-prompt pass rates recorded
    from every scored group; a prompt outside [low, high] is skipped before generation."""

    enabled: bool = False
    """Skip drawn prompts whose recorded pass rate is outside [low, high] (fate
    skipped:too_hard / skipped:too_easy in the ledger, counted in data/prompts_skipped)."""
    low: float = Field(0.0, ge=0, le=1)
    """Skip a prompt whose pass rate is below this (too hard)."""
    high: float = Field(1.0, ge=0, le=1)
    """Skip a prompt whose pass rate is above this (too easy)."""
    min_samples: int = Field(4, ge=1)
    """Recorded answers a prompt needs before its pass rate is trusted; fewer: generated."""
    max_skips: int = Field(3, ge=1)
    """A prompt skipped this many times in a row is generated again, so its pass rate follows
    the policy (and a dataset the filter rejects entirely cannot stall the run)."""

    @model_validator(mode="after")
    def _bounds(self) -> CurriculumConfig:
        if self.low > self.high:
            raise ValueError(f"data.curriculum.low ({self.low}) is above data.curriculum.high "
                             f"({self.high}): no prompt could be kept; set low <= high")
        if self.enabled and self.low == 0 and self.high == 1:
            raise ValueError("data.curriculum.enabled with low=0 and high=1 skips nothing: "
                             "raise data.curriculum.low or lower data.curriculum.high")
        return self


class DataConfig(Section):
    task: str = "sort_digits"
    """Built-in procedural task that generates prompts (see asyncrl.data.tasks.TASKS)."""
    task_kwargs: dict[str, int | float | str | bool] = {}
    """Keyword arguments for the task (difficulty, lengths)."""
    eval_size: int = Field(200, ge=1)
    """Held-out prompts for the accuracy evaluation (disjoint seed stream from training); with
    eval_file, at most this many of its lines."""
    train_file: str | None = None
    """JSONL of training prompts (one object per line); None: generate them from the task."""
    eval_file: str | None = None
    """JSONL of held-out prompts; None: generate them from the task."""
    prompt_key: str = "prompt"
    """Field of a JSONL line that holds the prompt text."""
    answer_key: str = "answer"
    """Field of a JSONL line that holds the reference answer (given to the reward)."""
    drop_all_equal: bool = False
    """Dynamic sampling (DAPO): drop groups whose rewards are all equal (no learning signal)."""
    expert_field: str | None = None
    """Off-policy expert data (CHORD): where a prompt's expert response is, 'answer' (the
    reference answer, e.g. of a built-in task) or a JSONL field; each trained group's prompt
    then adds its expert response to the batch, trained by the algorithm.expert_* SFT term.
    None: off."""
    curriculum: CurriculumConfig = CurriculumConfig()
    """Skip prompts that are too easy or too hard, from their recorded pass rates."""


class VllmOptions(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype inside vLLM; float32 makes its logprobs match the trainer's (to ~1e-6)."""
    kv_cache_memory_bytes: int | None = Field(64 << 20, ge=1 << 20)
    """KV cache size in bytes; None sizes it from gpu_memory_utilization (GPU)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (used when kv_cache_memory_bytes is None)."""
    enforce_eager: bool = True
    """Skip torch.compile and CUDA graphs: starts much faster (CPU); set false on GPUs."""


class AdaptiveSamplesConfig(Section):
    """Variable samples per prompt (asyncrl.data.curriculum); groups then differ in size."""

    mode: Literal["off", "pass_rate", "two_stage"] = "off"
    """'pass_rate': a prompt with a recorded pass rate p gets round(n_min + (n_max − n_min) ×
    (1 − p)) samples, unknown prompts rollout.n_samples (BroRL, DRIVE hard focus);
    'two_stage': stage2_n samples from policy version stage2_version on (DRIVE 8 → 64)."""
    n_min: int = Field(2, ge=2)
    """pass_rate: samples of a prompt always solved."""
    n_max: int = Field(16, ge=2)
    """pass_rate: samples of a prompt never solved."""
    stage2_version: int = Field(0, ge=0)
    """two_stage: the policy version from which every prompt gets stage2_n samples."""
    stage2_n: int = Field(64, ge=2)
    """two_stage: samples per prompt in the second stage."""

    @model_validator(mode="after")
    def _range(self) -> AdaptiveSamplesConfig:
        if self.n_min > self.n_max:
            raise ValueError(f"rollout.adaptive_samples.n_min ({self.n_min}) is above n_max "
                             f"({self.n_max}): set n_min <= n_max")
        return self

    def smallest(self, default: int) -> int:
        """The smallest group this rule can start (default: rollout.n_samples)."""
        return {"off": default, "pass_rate": min(default, self.n_min),
                "two_stage": min(default, self.stage2_n)}[self.mode]


class RolloutConfig(Section):
    engine: Literal["cpu", "vllm"] = "cpu"
    """Inference engine of the rollout workers: 'cpu' (PyTorch, fast start) or 'vllm'."""
    vllm: VllmOptions = VllmOptions()
    """Options of the vllm engine (ignored by the cpu engine)."""
    num_workers: int = Field(1, ge=1)
    """Rollout worker actors, each holding one engine."""
    worker_num_cpus: float = Field(0.5, gt=0)
    """CPUs Ray reserves for each rollout worker."""
    worker_num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each rollout worker (1 for a vLLM engine on its own GPU)."""
    worker_resources: dict[str, float] = {}
    """Custom Ray resources each rollout worker needs, e.g. {rollout: 1} to place the pool on
    nodes started with `ray start --resources '{"rollout": 8}'`."""
    placement: Placement | None = None
    """Reserve the pool as one Ray placement group, a bundle per worker, with this strategy
    (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) before any worker starts; None: place each
    worker on its own."""
    prompts_per_step: int = Field(32, ge=1)
    """Groups (prompts) in one training batch."""
    n_samples: int = Field(8, ge=1)
    """Answers sampled per prompt (the group size)."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest answer, in tokens."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature; logprobs are of softmax(logits / temperature)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1 disables)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0 disables)."""
    oversample: float = Field(1.0, ge=1.0)
    """Admit (oversample − 1) × prompts_per_step groups beyond the staleness gate while the
    next batch is not yet ready, so it fills before the slowest finish (APRIL)."""
    request_timeout_s: float = Field(1800.0, gt=0)
    """Longest one generate request (a group, or an evaluation shard) may take; past it the
    worker counts as hung: it is replaced and the request's samples are generated again."""
    partial: bool = False
    """APRIL partial rollouts: when a batch is full, abort in-flight answers and resume them
    later from their tokens (under newer weights) instead of waiting for them."""
    workflow: str | None = None
    """Multi-turn episodes: a built-in environment ('python_tool', 'guess_number') or a
    'package.module:factory' path (a class or function called with workflow_kwargs, returning
    an object with start(prompt) -> dict and step(turn, state) -> Step); None: single-turn.
    Observation tokens are never trained; max_new_tokens bounds model + observation tokens."""
    workflow_kwargs: dict[str, Any] = {}
    """Keyword arguments of the workflow (e.g. python_tool's timeout_s)."""
    max_turns: int = Field(4, ge=1)
    """Model turns per multi-turn episode (rollout.workflow only)."""
    max_turn_tokens: int | None = Field(None, ge=1)
    """Model tokens per turn; a turn ends at EOS or here (None: what is left of
    max_new_tokens). rollout.workflow only."""
    adaptive_samples: AdaptiveSamplesConfig = AdaptiveSamplesConfig()
    """Samples per prompt chosen per prompt (off: every prompt gets n_samples)."""


class RewardConfig(Section):
    type: Literal["local", "remote"] = "local"
    """'local': the reward pool runs `fn`; 'remote': it calls a gRPC reward server at `address`
    (started with `asyncrl serve-reward`)."""
    fn: str = "task"
    """Reward function: a registered name ('task', 'exact_match', ...) or
    'package.module:function' taking (prompt, response) and returning a float or Reward."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of the reward (e.g. the regex `pattern`, math `timeout_s`)."""
    transforms: list[dict[str, Any]] = []
    """Reward transforms applied in order, each `{type: NAME, **kwargs}`: overlong_penalty
    (DAPO soft punishment), length_penalty, format_penalty (see asyncrl/reward/builtin)."""
    address: str | None = None
    """type=remote: 'host:port' of the reward server."""
    token_env: str = "ASYNCRL_REWARD_TOKEN"
    """type=remote: environment variable holding the server's shared-secret token."""
    tls_ca: str | None = None
    """type=remote: PEM file of the CA that signed the server's certificate; None: plaintext."""
    num_workers: int = Field(1, ge=0)
    """Reward worker actors; 0 scores in the driver process."""
    num_cpus: float = Field(0.25, ge=0)
    """CPUs Ray reserves for each reward worker."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each reward worker (a reward model on a GPU)."""
    resources: dict[str, float] = {}
    """Custom Ray resources each reward worker needs (places the pool on its own nodes)."""
    placement: Placement | None = None
    """As rollout.placement, for the reward workers."""
    concurrency: int = Field(32, ge=1)
    """Rewards one worker scores at once."""
    batch_size: int = Field(64, ge=1)
    """Samples per call to a reward worker."""
    timeout_s: float = Field(60.0, gt=0)
    """Longest one reward may take; past it the sample's reward fails with reason 'timeout'."""
    retries: int = Field(2, ge=0)
    """Further attempts of a batch after a failed call (a lost worker is replaced first)."""
    backoff_s: float = Field(0.5, ge=0)
    """Wait before the first retry; doubled at each further one."""
    on_failure: Literal["drop_group", "score"] = "drop_group"
    """A failed reward (timeout, crash, error): 'drop_group' drops its group (counted under
    data/dropped/reward_failed); 'score' gives it `failure_value`. Either way it is counted in
    reward/failures/<reason>."""
    failure_value: float = Field(0.0, allow_inf_nan=False)
    """The reward a failure gets under on_failure='score'."""

    @model_validator(mode="after")
    def _remote_needs_address(self) -> RewardConfig:
        if self.type == "remote" and not self.address:
            raise ValueError("type 'remote' needs address: set reward.address=HOST:PORT")
        if self.type == "local" and self.address:
            raise ValueError("address is only used with type 'remote': set reward.type=remote "
                             "or drop reward.address")
        return self


class AlgorithmConfig(Section):
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator over each group's rewards."""
    normalize_std: bool = True
    """GRPO: divide by the group's reward std."""
    loss: Literal["ppo_clip", "dual_clip", "dapo", "gspo", "cispo"] = "ppo_clip"
    """Policy loss."""
    clip_low: float | None = Field(None, ge=0)
    """Lower clip range ε_low of the importance ratio. None: the loss's own default (PPO and
    DAPO 0.2, GSPO 3e-4; CISPO none)."""
    clip_high: float | None = Field(None, ge=0)
    """Upper clip range ε_high. None: the loss's own default (PPO 0.2, DAPO 0.28, GSPO 4e-4,
    CISPO 0.2); above clip_low it is DAPO's clip-higher."""
    dual_clip_c: float = Field(3.0, gt=1)
    """loss=dual_clip only: a token with A < 0 has its loss capped at c·|A| (Ye et al. 2020),
    so a bad token whose ratio grew past c stops pushing; must be > 1."""
    aggregation: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    """How per-token losses are reduced to one number."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the initial (reference) policy; 0 disables it."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator."""
    kl_clamp: float | None = Field(10.0, gt=0)
    """k3 only: |log π − log π_ref| is clamped to this before the exp, so the estimate stays
    finite (its gradient is 0 beyond the clamp); None: no clamp."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    off_policy_correction: Literal["none", "decoupled", "tis", "decoupled_filter"] = "decoupled"
    """Weight each token by min(π_old / π_behaviour, cap): 'decoupled' PPO (stale samples) or
    'tis' (truncated importance sampling for engine/trainer mismatch); 'decoupled_filter' drops
    tokens above the cap instead (AReaL's rule)."""
    behaviour_weight_cap: float = Field(2.0, gt=0)
    """Cap of the behaviour importance weight."""
    expert_coef: float = Field(0.5, ge=0, le=1)
    """μ at the first step: the weight of the expert SFT term, (1 − μ) that of the RL loss
    (CHORD; used with data.expert_field, see asyncrl/algo/expert.py)."""
    expert_coef_end: float | None = Field(None, ge=0, le=1)
    """μ at the last step (None: expert_coef throughout)."""
    expert_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """How μ moves from expert_coef to expert_coef_end over run.steps."""
    expert_token_weighting: Literal["none", "p_one_minus_p"] = "none"
    """Weight of each expert token's NLL: 1, or CHORD-φ's p·(1 − p) (p = the policy's
    probability of the token), which spares tokens already learnt and ones far off-policy."""

    @model_validator(mode="after")
    def _warn_ignored_fields(self) -> AlgorithmConfig:
        """A field set for an option that is not selected is ignored: say so, loudly but not
        fatally (a sweep may switch an option off and keep its knobs)."""
        needs = {  # field: (what it applies to, whether that is selected, the fix)
            "normalize_std": ("advantage=grpo", self.advantage == "grpo", "advantage=grpo"),
            "dual_clip_c": ("loss=dual_clip", self.loss == "dual_clip", "loss=dual_clip"),
            "kl_clamp": ("kl_estimator=k3 with kl_coef > 0",
                         self.kl_estimator == "k3" and self.kl_coef > 0,
                         "kl_estimator=k3 and algorithm.kl_coef > 0"),
            "kl_estimator": ("kl_coef > 0", self.kl_coef > 0, "kl_coef > 0"),
            "behaviour_weight_cap": ("an off_policy_correction", self.off_policy_correction
                                     != "none", "off_policy_correction=decoupled (or tis)"),
        }
        # Changed from its default, not merely present: a resumed run's resolved config lists
        # every field.
        for name, (applies_to, selected, fix) in needs.items():
            if getattr(self, name) != type(self).model_fields[name].default and not selected:
                log.warning("algorithm.%s only applies to %s, so it is ignored: set "
                            "algorithm.%s, or drop algorithm.%s", name, applies_to, fix, name)
        return self


class TrainerConfig(Section):
    backend: Literal["torch", "megatron"] = "torch"
    """Trainer backend: 'torch' (an HF model, one process) or 'megatron' (megatron-core
    GPTModel of a Qwen2/Llama checkpoint; tensor, pipeline and data parallel; needs the
    `megatron` extra)."""
    device: str = "cpu"
    """Torch device of the trainer ('cpu', 'cuda')."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for the trainer actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for the trainer actor (1 with device 'cuda')."""
    resources: dict[str, float] = {}
    """Custom Ray resources the trainer needs (places it on its own nodes)."""
    placement: Placement | None = None
    """As rollout.placement, for the trainer (one bundle: its resources reserved before it
    starts; a restarted trainer gets a new one)."""
    call_timeout_s: float = Field(1800.0, gt=0)
    """Longest one trainer call (a training step, a weight broadcast) may take; past it the
    trainer counts as hung and the job restarts from its newest checkpoint."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate decay over the run's optimizer steps (to lr × min_lr_ratio at the end)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr (linear and cosine schedules)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to lr."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global gradient norm."""
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward; gradients accumulate across micro-batches."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per training batch (PPO minibatches); each bumps the policy version."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Megatron only: ranks each weight matrix is split over; must divide the model's
    key/value heads and MLP width."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """Megatron only: pipeline stages, each holding an equal share of the layers; must divide
    the model's layer count."""
    data_parallel_size: int = Field(1, ge=1)
    """Megatron only: model replicas, each training a contiguous part of every minibatch.
    The trainer runs tensor × pipeline × data parallel ranks (one GPU each on CUDA)."""

    @model_validator(mode="after")
    def _parallel_needs_megatron(self) -> TrainerConfig:
        sizes = {name: getattr(self, name) for name in
                 ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")}
        if self.backend != "megatron" and any(size > 1 for size in sizes.values()):
            bad = ", ".join(f"trainer.{k}={v}" for k, v in sizes.items() if v > 1)
            raise ValueError(
                f"{bad} needs trainer.backend=megatron (the {self.backend} backend runs one "
                "process): set trainer.backend=megatron, or the size(s) back to 1")
        return self


class SyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Weight broadcast backend; auto: nccl when the trainer is on a GPU, else gloo."""
    bucket_mb: float = Field(64.0, gt=0)
    """Size of the flat buckets weights travel in."""
    timeout_s: float = Field(120.0, gt=0)
    """Longest wait of any weight-sync step before the run fails with a clear error."""


class MetricsConfig(Section):
    port: int | None = Field(None, ge=0, le=65535)
    """Serve Prometheus metrics on this port (0: any free port); None: no endpoint."""
    host: str = "127.0.0.1"
    """Address of the metrics endpoint; 0.0.0.0 exposes it beyond this machine."""


class RunConfig(Section):
    name: str = Field("tiny-sort", pattern=r"^[A-Za-z0-9_.-]+$")
    """Run name; outputs go to output_dir/name."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seed for data, model init, sampling."""
    steps: int = Field(150, ge=1)
    """Training batches to run."""
    eval_every: int = Field(25, ge=1)
    """Evaluate held-out accuracy every this many steps (and at the start and the end)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for the embedded Ray cluster (None: all of this machine's)."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a whole-job checkpoint every this many steps into run_dir/checkpoint (0: never)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep (older ones are deleted)."""
    max_restarts: int = Field(3, ge=0)
    """Times the job restarts from its newest checkpoint after losing the trainer actor."""
    batch_timeout_s: float = Field(600.0, gt=0)
    """Longest the trainer waits for one batch before the run fails with a clear error."""
    placement_timeout_s: float = Field(600.0, gt=0)
    """Longest a pool's placement group (rollout.placement, reward.placement) may take to be
    placed (an autoscaler adding nodes) before the run fails naming the pool."""


class JobConfig(Section):
    mode: Literal["sync", "async"] = "sync"
    """'sync': generate → reward → train → update, on-policy. 'async': rollouts overlap training."""
    max_staleness: int | None = Field(None, ge=0)
    """η: no trained sample has a token more than η policy versions older than the trainer.
    Unset: 0 in sync mode, 1 in async mode."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    sync: SyncConfig = SyncConfig()
    metrics: MetricsConfig = MetricsConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.max_staleness is None:
            self.max_staleness = 0 if self.mode == "sync" else 1
        if self.mode == "sync" and self.max_staleness != 0:
            raise ValueError(
                f"mode 'sync' is on-policy, so max_staleness must be 0 (got {self.max_staleness}):"
                " set max_staleness=0 or mode=async"
            )
        over = self.rollout.partial or self.rollout.oversample > 1
        if over and self.max_staleness < 1:
            raise ValueError(
                "rollout.partial and rollout.oversample > 1 resume or keep answers across a "
                "weight update, so they need max_staleness >= 1: set mode=async and "
                "max_staleness=1 (or more), or turn them off"
            )
        if self.rollout.n_samples < 2:
            raise ValueError(
                f"rollout.n_samples={self.rollout.n_samples}: every advantage estimator here is "
                "group-relative, so a group of one sample gets zero advantage and learns "
                "nothing: set rollout.n_samples >= 2"
            )
        optimizer_steps = self.run.steps * self.trainer.minibatches
        if self.trainer.warmup_steps >= optimizer_steps:
            raise ValueError(
                f"trainer.warmup_steps ({self.trainer.warmup_steps}) must be below the run's "
                f"optimizer steps (run.steps × trainer.minibatches = {optimizer_steps}), or the "
                "learning rate never reaches trainer.lr: lower it"
            )
        if self.model.path is None and (self.rollout.max_new_tokens
                                        >= self.model.tiny.max_position_embeddings):
            raise ValueError(
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for the "
                f"prompt in model.tiny.max_position_embeddings "
                f"({self.model.tiny.max_position_embeddings}): lower it or raise the other"
            )
        self._check_cpus()
        if self.reward.placement and self.reward.num_workers == 0:
            raise ValueError("reward.placement needs reward workers (reward.num_workers ≥ 1); "
                             "with 0 the reward runs in the driver: drop reward.placement")
        if self.reward.placement and not (self.reward.num_cpus or self.reward.num_gpus
                                          or self.reward.resources):
            raise ValueError("reward.placement: a bundle must reserve something; set "
                             "reward.num_cpus > 0 (or num_gpus, resources)")
        if self.reward.num_gpus and self.reward.num_workers == 0:
            raise ValueError("reward.num_gpus is for reward worker actors; set "
                             "reward.num_workers ≥ 1 (0 scores in the driver, without a GPU)")
        if self.data.expert_field and self.trainer.pipeline_parallel_size > 1:
            raise ValueError("data.expert_field (expert SFT term) is not supported with "
                             "trainer.pipeline_parallel_size > 1 yet: use tensor or data "
                             "parallelism, or drop data.expert_field")
        smallest = self.rollout.adaptive_samples.smallest(self.rollout.n_samples)
        if self.trainer.minibatches > self.rollout.prompts_per_step * smallest:
            raise ValueError(
                f"trainer.minibatches ({self.trainer.minibatches}) exceeds the samples per batch"
                f" (rollout.prompts_per_step × rollout.n_samples = "
                f"{self.rollout.prompts_per_step * smallest}, with the smallest group "
                "rollout.adaptive_samples allows): lower it"
            )
        return self

    def _check_cpus(self) -> None:
        """An embedded cluster of run.num_cpus CPUs must fit every actor, or the job waits
        forever for resources Ray will never have."""
        if self.run.num_cpus is None:
            return
        wanted = {
            "rollout.num_workers × rollout.worker_num_cpus":
                self.rollout.num_workers * self.rollout.worker_num_cpus,
            "reward.num_workers × reward.num_cpus": self.reward.num_workers * self.reward.num_cpus,
            "trainer.num_cpus": self.trainer.num_cpus,
        }
        if sum(wanted.values()) > self.run.num_cpus + 1e-9:
            parts = ", ".join(f"{k} = {v:g}" for k, v in wanted.items())
            raise ValueError(
                f"the actors need {sum(wanted.values()):g} CPUs ({parts}) but run.num_cpus is "
                f"{self.run.num_cpus}: raise run.num_cpus or lower the per-actor CPUs"
            )
