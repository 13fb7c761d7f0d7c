"""The settings of a rollout run (rollouts.py), a fit (fit.py) and a branch probe (probe.py).

Contract: `RolloutConfig`, `FitArgs` and `ProbeConfig` are plain dataclasses, a default for every field and a
`help` for each that is a flag (`fit`'s and `probe-branches`' flags are made from them, cli_flags.py and
probe_cli.py). This module imports nothing of the project or of torch, so the command line builds them before
anything heavy loads (cli_config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FitArgs", "ProbeConfig", "RolloutConfig"]


@dataclass
class RolloutConfig:
    samples: int = field(default=20, metadata={"help": "rollouts per problem (K)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus mass"})
    max_new_tokens: int = field(default=384, metadata={"help": "completion budget; hitting it scores 0"})
    seed: int = field(default=0, metadata={"help": "base seed; sample seeds derive from (seed, row, sample)"})
    prompt_style: str = field(default="auto", metadata={"help": "auto | chat | paper"})
    concurrency: int = field(default=32, metadata={"help": "requests decoded together"})
    stop: tuple[str, ...] | None = field(default=None, metadata={
        "help": "stop strings (excluded from the text); None: the prompt style's (paper: Human:, Assistant:)"})


@dataclass
class FitArgs:
    kind: str = field(default="head", metadata={"help": "head | lora"})
    name: str = field(default="adapter", metadata={"help": "registered name of the adapter"})
    threshold: float | None = field(default=None, metadata={
        "help": "tau in nats, or calibrate (to --target-fire-rate)"})
    target_fire_rate: float = field(default=0.03, metadata={"help": "fraction of completion tokens above tau"})
    keep_problems: int = field(default=50, metadata={"help": "M: mixed problems kept, closest to pass rate 0.5"})
    adv_clip: float = field(default=2.5, metadata={"help": "advantages clipped to [-clip, clip]"})
    kl_weight: float = field(default=0.2, metadata={"help": "weight of the KL(base || adapted) anchor"})
    epochs: int = field(default=1, metadata={"help": "passes over the kept rollouts"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps (see --warmup-cap)"})
    accumulation: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    seed: int = field(default=42, metadata={"help": "seed of init and data order"})
    top_k: int = field(default=5, metadata={"help": "head: candidates corrected per position"})
    rank: int = field(default=32, metadata={"help": "head rank, or LoRA r"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    lora_targets: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    checkpoints: int = field(default=1, metadata={"help": "evenly spaced checkpoints offered to the callback"})
    trim: float = field(default=1.0, metadata={
        "help": "keep the globally shortest fraction of the kept problems' rollouts before advantages"})
    order: str = field(default="shuffle", metadata={
        "help": "shuffle (seeded, per epoch) | curriculum (|A| x decision density, descending)"})
    max_steps: int = field(default=0, metadata={
        "help": "stop after this many optimizer steps, the schedule still sized for --epochs (0: run it all)"})
    warmup_cap: bool = field(default=True, metadata={
        "help": "cap the warm-up at a third of the steps (false: the released schedule, warm-up as given)"})
    checkpoint_every: float = field(default=0.0, metadata={
        "help": "a checkpoint every this fraction of an epoch; 0: use --checkpoints"})
    autocast: str = field(default="none", metadata={"help": "lora: none | bfloat16 (autocast of the forwards)"})
    teacher_target: str = field(default="kl", metadata={
        "help": "with a teacher: kl (KL(teacher || adapted) on the candidates) | argmax (the teacher's best "
                "candidate as a hard target)"})


@dataclass
class ProbeConfig:
    tau: float = field(default=1.4, metadata={"help": "decision points: completion positions with base H > tau"})
    positions: int = field(default=3, metadata={"help": "branch points per answer, of each kind"})
    alternatives: int = field(default=3, metadata={"help": "base alternatives forced at each point"})
    continuations: int = field(default=2, metadata={"help": "continuations sampled per (point, candidate)"})
    seed: int = field(default=0, metadata={"help": "seed of the answer, position and continuation draws"})
    concurrency: int = field(default=64, metadata={"help": "continuations decoded together"})
