"""`reasonmaxxer fit`: fit a correction adapter from rollouts (or run the rollouts first).

Contract: `add_arguments(parser)` adds the flags; `main(args)` builds `FitConfig` once, checks everything that can
be checked before a model loads (flags, output folder, model names, the rollout file or the problems, the
validation split, none of them evaluation rows), then (samples the rollouts,) scores, fits, validates and saves
the adapter, and prints a short summary. Ctrl-C ends with one line that says what is kept and how to resume
(exit 130). A bad input raises ValueError / FileNotFoundError saying what to do (the top-level CLI prints one
line and exits 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

from reasonmaxxer import models
from reasonmaxxer.steering.manifest import base_identity

from . import preflight, rollouts_cli
from .cli_config import FitConfig, build_engine, build_verifier, vllm_engine
from .cli_flags import add_fit_arg_flags, add_model_flags, add_problem_flags, add_recipe_flag, add_rollout_flags, taus
from .problems import ProblemSet, check_not_evaluation

__all__ = ["add_arguments", "collapse_warning", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.description = ("Fit a head or LoRA correction adapter from a rollout file, or sample the rollouts first with "
                     "--problems.")
    add_model_flags(p, "model dtype, for the fit and its validation (default: float32 for lora; for head "
                    "bfloat16, or float32 on a CPU without native bf16: AVX2 only; validation in the preferred "
                    "dtype of its device)")
    p.add_argument("--rollouts", default=None, metavar="FILE",
                   help="rollout JSONL; with --problems it is written first (default: OUT.rollouts.jsonl)")
    add_problem_flags(p, required=False)
    add_rollout_flags(p)
    add_problem_flags(p, prefix="val-", required=False)
    p.add_argument("--val-samples", type=int, default=2, metavar="K", help="samples per validation problem")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    p.add_argument("--score-cache", default=None, metavar="DIR",
                   help="keep the teacher-forced scores here and reuse them: a refit on the same rollouts and "
                        "model skips the scoring pass (head: seconds instead of minutes) (default: none)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="keep each run's training state here at every checkpoint, and the validation results: "
                        "the same command run again continues from the last checkpoint instead of starting over "
                        "(head adapters; small files: a few MB per tau) (default: none)")
    p.add_argument("--tau-sweep", type=taus, default=None, metavar="TAU,TAU,...",
                   help="refit one adapter per tau (e.g. 1.0,1.4,1.8) from one scoring pass; keep the best on "
                        "validation (needs --val-problems); the adapter records the sweep (default: none)")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distil this model's choices at the decision points instead of the rollouts' rewards: a model "
                        "with the base's tokenizer (known name or folder); the loss there is KL(teacher || adapted) "
                        "on the base top-k candidates (see --teacher-target) (default: none: the contrastive fit)")
    p.add_argument("--val-mode", default="gated", choices=["gated", "always"],
                   help="the mode checkpoints are scored in on validation: the mode the adapter will be served in")
    p.add_argument("--val-backend", default="transformers", choices=["transformers", "vllm"],
                   help="the engine that scores checkpoints (vllm: about twice as fast on a CPU)")
    add_recipe_flag(p)
    add_fit_arg_flags(p)


class Inputs(NamedTuple):
    """What `fit` reads before any model loads."""

    val: ProblemSet | None  # the validation split
    problems: ProblemSet | None  # --problems: the rollouts are sampled first
    loaded: tuple[dict, list[dict]] | None  # (meta, records) of the rollout file; None with --problems


def main(args: argparse.Namespace) -> int:
    """Check, (sample the rollouts,) score, fit, validate, save. Ctrl-C ends with one line that says what is kept
    and how to resume (exit 130)."""
    config = FitConfig.from_args(args)
    inputs = _preflight(config)
    try:
        return _fit(config, inputs)
    except KeyboardInterrupt:
        from .rollouts import load_rollouts  # torch

        if inputs.problems is not None:
            line, complete = rollouts_cli.interrupted(config.rollouts, inputs.problems)
            if not complete:
                print("\n" + line, file=sys.stderr)
                return 130
        path = config.rollouts.out
        n = len((inputs.loaded or load_rollouts(path))[1])
        cache = (f"; the scores done so far are cached in {config.score_cache}" if config.score_cache else
                 " (add --score-cache DIR to keep scores across runs)")
        if config.checkpoint_dir:
            cache += f"; the training states and validation results so far are in {config.checkpoint_dir}"
        print(f"\ninterrupted: the fit was stopped before it saved {config.out}; the {n:,} rollouts in {path} are "
              f"kept{cache}; run the same command to resume: {shlex.join(config.rollouts.command)}", file=sys.stderr)
        return 130


def _preflight(config: FitConfig) -> Inputs:
    """Everything `fit` can check before a model loads: flags, output folder, model names, the rollout file or
    the problems, the validation split."""
    from .rollouts import load_rollouts, resume_check  # torch

    if config.tau_sweep and config.val.path is None:
        raise ValueError("--tau-sweep keeps the tau that does best on validation: add --val-problems FILE "
                         "(with --val-offset/--val-limit; a training pool, disjoint from the rollouts)")
    preflight.check_output(config.out, "dir")
    preflight.check_sampling(config.rollouts, config)
    val = config.val.load() if config.val.path is not None else None  # read once, checked first
    problems = config.rollouts.problems.load() if config.rollouts.problems.path is not None else None
    loaded = None if problems else load_rollouts(config.rollouts.out)  # --problems: checked again once it is made
    _check_sources(loaded[0] if loaded else {"problems": problems.selection}, val)
    for spec in (config.rollouts.engine.model, *([config.teacher] if config.teacher else [])):
        models.check_model_spec(spec)
    if loaded:
        return Inputs(val, None, loaded)
    sampling = config.rollouts.sampling
    done = resume_check(config.rollouts.out, problems, sampling)
    print(preflight.plan(len(problems), sampling.samples, sampling.max_new_tokens, done, config.rollouts.out,
                         config.rollouts.problems.limit is not None), file=sys.stderr)
    return Inputs(val, problems, None)


def _check_sources(meta: dict, val: ProblemSet | None) -> None:
    """Before any model work: training rollouts and validation rows (`val`, or None) read no evaluation rows,
    and are disjoint."""
    check_not_evaluation(meta.get("problems", {}), "the training rollouts' problem selection")
    if val is not None:
        check_not_evaluation(val.selection, "the validation split")
        _check_val_disjoint(meta, val)


def _check_val_disjoint(meta: dict, val: ProblemSet) -> None:
    train = meta.get("problems", {})
    if train.get("sha256") == val.selection.get("sha256"):
        shared = set(train.get("indices", [])) & set(val.selection.get("indices", []))
        if shared:
            raise ValueError(
                f"the validation problems share {len(shared)} rows with the training rollouts' problems: "
                "pick another file or a disjoint --val-offset/--val-limit range"
            )


def _fit(config: FitConfig, inputs: Inputs) -> int:
    from .fit import fit  # torch
    from .rollouts import load_rollouts

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    engine, path = config.rollouts.engine, config.rollouts.out
    device = models.resolve_device(engine.device)
    dtype = engine.dtype or (models.preferred_dtype(device) if config.fit.kind == "head" else "float32")
    model, tokenizer = models.load_model(engine.model, dtype=dtype, device=device)
    loaded = inputs.loaded
    if loaded is None:
        summary = rollouts_cli.sample(config.rollouts, model, tokenizer, inputs.problems)
        for warning in preflight.warnings(summary, config.rollouts.sampling.samples,
                                          config.rollouts.sampling.max_new_tokens):
            print(warning, file=sys.stderr)
        times["rollouts_s"] = time.perf_counter() - t0
        loaded = load_rollouts(path)
        _check_sources(loaded[0], inputs.val)
    meta, records = loaded
    if meta["model"]["fingerprint"] != base_identity(model, tokenizer, engine.model).fingerprint:
        raise ValueError(f"{path} was made with model {meta['model']['name']!r}, not {engine.model!r}: "
                         "fit on the model the rollouts came from")
    teacher = _load_teacher(config.teacher, tokenizer, dtype, model.device) if config.teacher else None
    validate, val_report, val_engine = _validation(config, inputs.val, model, tokenizer)
    try:
        adapter, report = fit(model, tokenizer, records, config.fit, callback=validate,
                              provenance={"model": engine.model, "command": " ".join(["reasonmaxxer", *sys.argv[1:]]),
                                          "rollouts": str(path), "rollout_meta": meta, "teacher": config.teacher},
                              score_cache=config.score_cache, tau_sweep=config.tau_sweep, teacher=teacher,
                              checkpoint_dir=config.checkpoint_dir)
    finally:
        if val_engine is not None and hasattr(val_engine, "close"):
            val_engine.close()
    adapter.manifest.metrics["validation"] = val_report
    adapter.save(config.out)
    times.update(report["times"])
    _print_summary(config.out, adapter, report, val_report, times)
    return 0


def _load_teacher(spec: str, tokenizer, dtype: str, device):
    """The teacher's model for `fit --teacher`, after checking (by its tokenizer alone) that it shares the base's
    vocabulary and special tokens; ValueError saying what differs."""
    from reasonmaxxer.steering.teacher import check_vocabulary  # torch

    check_vocabulary(tokenizer, models.load_tokenizer(spec), f"--teacher {spec}: it cannot teach this model")
    return models.load_model(spec, dtype=dtype, device=str(device))[0]


def _val_engine(config: FitConfig, model, tokenizer):
    """The engine that scores checkpoints: the embedded one (a separate copy of the model for LoRA, which PEFT
    wraps while training), or vLLM (`--val-backend vllm`: head adapters gated or always, LoRA always), in
    --dtype where given (else the preferred dtype of the device it runs on)."""
    engine, kind = config.rollouts.engine, config.fit.kind
    if config.val_backend == "vllm":
        if kind == "lora" and config.val_mode != "always":
            raise ValueError("vLLM serves LoRA adapters always-on only: use --val-mode always or --val-backend "
                             "transformers")
        return vllm_engine(engine, tokenizer, lora_rank=config.fit.rank if kind == "lora" else None)
    val_model = model if kind == "head" else models.load_model(engine.model, dtype=engine.dtype)[0]
    return build_engine(engine, val_model, tokenizer)


def _validation(config: FitConfig, val: ProblemSet | None, model, tokenizer):
    """(callback scoring each checkpoint's pass@1 on the validation split `val` in --val-mode, report,
    engine); (None, {}, None) without a validation split."""
    report: dict[str, Any] = {}
    if val is None:
        return None, report, None
    from reasonmaxxer.steering.request import SteeringParams  # torch

    from .rollouts import evaluate  # torch

    engine = _val_engine(config, model, tokenizer)
    sampling = replace(config.rollouts.sampling, samples=config.val_samples, seed=config.rollouts.sampling.seed + 1)
    verifier = build_verifier(config.rollouts.verifier_fallbacks)
    report.update(problems=val.selection, samples=config.val_samples, mode=config.val_mode,
                  backend=config.val_backend)
    kept = _ValidationLog(config, report)  # with --checkpoint-dir: what a rerun need not evaluate again
    if "base" not in report:
        report.update(base=evaluate(engine, val, sampling, verifier.score, progress=True), checkpoints=[])
        kept.save()

    def callback(step: int, adapter) -> float:
        tau = adapter.manifest.gate.tau
        done = next((c for c in report["checkpoints"] if c["step"] == step and c["tau"] == tau), None)
        if done is not None:  # evaluated before the run was stopped, after its last saved state
            return done["pass@1"]
        engine.add_adapter(adapter)
        try:
            result = evaluate(engine, val, sampling, verifier.score, SteeringParams(adapter.name, config.val_mode),
                              True)
        finally:
            engine.remove_adapter(adapter.name)
        report["checkpoints"].append({"step": step, "tau": tau, **result})
        kept.save()
        print(f"checkpoint {step} (tau {tau:.2f}): validation pass@1 {result['pass@1']:.3f} "
              f"(base {report['base']['pass@1']:.3f}), fire rate {result['fire_rate']:.3%}")
        return result["pass@1"]

    return callback, report, engine


class _ValidationLog:
    """The validation report kept in --checkpoint-dir (validation.json), written after the base and after each
    checkpoint: a rerun of the same validation (problems, samples, mode, backend, sampling) takes the base's result
    and the checkpoints evaluated so far from it instead of evaluating them again. Without the folder: nothing."""

    def __init__(self, config: FitConfig, report: dict):
        self.report = report
        self.path = Path(config.checkpoint_dir) / "validation.json" if config.checkpoint_dir else None
        self.key = json.loads(json.dumps({**report, "sampling": asdict(config.rollouts.sampling)}, default=str))
        if self.path is not None and self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("key") == self.key:
                report.update(base=saved["base"], checkpoints=saved["checkpoints"])

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"key": self.key, "base": self.report["base"],
                                       "checkpoints": self.report["checkpoints"]}, indent=1, default=str))
            os.replace(tmp, self.path)


def collapse_warning(d: dict[str, float]) -> str | None:
    """A warning when the fit pushed down the tokens it should raise: the unbounded negative term won."""
    if math.isnan(d["logp_shift_positive"]):
        return ("WARNING: no positive-advantage token lies at a decision point of the training rollouts, so the fit "
                "only pushed tokens down. Give it more mixed problems (more --samples or --limit, a larger "
                "--max-tokens if many answers are truncated) or a lower tau (--target-fire-rate).")
    if d["logp_shift_positive"] >= 0:
        return None
    return (f"WARNING: the fit lowered log p of the positive-advantage tokens too ({d['logp_shift_positive']:+.3f}): "
            "the negative term dominated (over-training). Refit with fewer steps or a smaller --lr, e.g. "
            "--epochs 1 --lr 0.0001, and check that this line reads positive / negative.")


def _print_summary(out, adapter, report, val_report, times) -> None:
    data, final = report["data"], report["final"] or {}
    print(f"\nwrote {out} ({adapter.manifest.kind}, tau {data['tau']:.3f}, fire rate {data['fire_rate']:.3%} "
          f"of {data['completion_tokens']} completion tokens; {data['sequences']} sequences, "
          f"{data['problems']} problems)")
    print(f"final loss {final.get('loss', float('nan')):.4f} (decision {final.get('decision', float('nan')):.4f}, "
          f"anchor {final.get('anchor', float('nan')):.5f}) after {report['steps']} steps")
    if "diagnostics" in data:
        d = data["diagnostics"]
        print(f"on the training rollouts at decision points: log p {d['logp_shift_positive']:+.3f} (positive "
              f"advantage), {d['logp_shift_negative']:+.3f} (negative); KL to base elsewhere {d['anchor_kl']:.4f}")
        warning = collapse_warning(d)
        if warning:
            print(warning)
    if val_report:
        best = max(val_report["checkpoints"], key=lambda c: c["pass@1"])
        print(f"validation pass@1: base {val_report['base']['pass@1']:.3f}, adapter (gated) {best['pass@1']:.3f} "
              f"at step {best['step']}, fire rate {best['fire_rate']:.3%}")
    print("wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in times.items()))
