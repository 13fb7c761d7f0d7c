"""`reasonmaxxer rollouts` and `reasonmaxxer fit`: argument parsing and the one-command pipelines.

Contract: `add_commands(subparsers)` registers both subcommands; each runs to completion, shows
progress bars, prints a short summary at the end, and raises ValueError / FileNotFoundError with a
message that says what to do on bad input (the top-level CLI turns those into exit code 2).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonmaxxer.steering.models import resolve_device

from . import preflight
from .cli_flags import _device_flag, fit_parser, json_object, rollouts_parser
from .recipe import ROLLOUT_DEFAULTS, resolve

if TYPE_CHECKING:
    from .fit import FitArgs

__all__ = ["_device_flag", "add_commands", "json_object"]

def add_commands(sub) -> None:
    """Add `rollouts` and `fit` (only those `sub.wants`, where the top-level CLI builds one command)."""
    wants = getattr(sub, "wants", lambda name: True)
    if wants("rollouts"):
        rollouts_parser(sub).set_defaults(func=run_rollouts_command)
    if wants("fit"):
        fit_parser(sub).set_defaults(func=run_fit_command)


def _fit_args(args) -> FitArgs:
    """FitArgs from the flags: given flags, else the recipe's value, else FitArgs' default."""
    from .fit import FitArgs

    defaults = {"fit_" + f.name: f.default for f in fields(FitArgs) if f.name != "lora_targets"}
    defaults["fit_threshold"] = "calibrate"
    if getattr(args, "fit_name", None) is None and getattr(args, "out", None):
        defaults["fit_name"] = name_of_folder(args.out)  # an adapter is named after its folder by default
    resolve(args, args.recipe, defaults)
    values = {f.name: getattr(args, "fit_" + f.name) for f in fields(FitArgs) if f.name != "lora_targets"}
    if values["threshold"] == "calibrate":
        values["threshold"] = None
    return FitArgs(**values)


def name_of_folder(folder: str | Path) -> str:
    """An adapter name (manifest.NAME: letters, digits, '.', '_', '-') made from a folder's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).resolve().name).lstrip("._-")[:128]
    return name or "adapter"


def _load_problems(args, prefix: str = ""):
    from .problems import load_problems

    get = lambda k: getattr(args, prefix + k)  # noqa: E731
    return load_problems(get("problems"), preset=get("preset"), question_field=get("question_field"),
                         answer_field=get("answer_field"), offset=get("offset"), limit=get("limit"),
                         seed=get("selection_seed"))


def _rollout_config(args):
    from .rollouts import RolloutConfig

    return RolloutConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, prompt_style=args.prompt_style,
                         concurrency=args.concurrency, stop=tuple(args.stop) if args.stop is not None else None)


def _verifier(args):
    from .verifier import Verifier

    return Verifier(fallbacks=tuple(x.strip() for x in args.verifier_fallbacks.split(",") if x.strip()))


def _do_rollouts(args, model, tokenizer, out: Path, problems=None) -> dict[str, Any]:
    from .rollouts import completed, run_rollouts

    problems = problems if problems is not None else _load_problems(args)
    done = completed(out, problems, _rollout_config(args), tokenizer)
    if done is not None:
        print(f"{out} already holds every rollout of this run: nothing to sample", file=sys.stderr)
        return done
    engine = _rollout_engine(args, model, tokenizer)
    try:
        with _verifier(args) as verifier:
            return run_rollouts(engine, problems, _rollout_config(args), out, verifier.score)
    finally:
        if args.backend == "vllm":
            engine.close()


def _rollouts_preflight(args, out: Path):
    """Everything that can be checked before a model loads: the flags, the model name, the problem file and
    its fields, the output path, and a file to resume from. Returns (problems, rollouts already in `out`)."""
    preflight.check_sampling(args)  # cheapest first: these need neither torch nor transformers
    preflight.check_output(out, "file")
    problems = _load_problems(args)
    from reasonmaxxer.steering.models import check_model_spec

    check_model_spec(args.model)
    from .rollouts import resume_check

    return problems, resume_check(out, problems, _rollout_config(args))


def _rollout_engine(args, model, tokenizer):
    if args.backend == "vllm":
        from reasonmaxxer.steering.models import preferred_dtype_here, resolve_model
        from reasonmaxxer.steering.vllm.offline import VllmOfflineEngine

        engine_args = {"dtype": args.dtype or preferred_dtype_here(), "max_num_seqs": args.concurrency,
                       **(args.vllm_args or {})}
        return VllmOfflineEngine.start(str(resolve_model(args.model)), tokenizer, engine_args, name=args.model)
    from reasonmaxxer.steering.engine import Engine

    # The reference numerics (fast=False) unless --fast: by default rollouts stay the ones the recipe's tests and
    # results were made with.
    return Engine(model, tokenizer, max_batch_size=args.concurrency, name=args.model, fast=args.fast)


def run_rollouts_command(args) -> int:
    """Check, say what will run, sample; Ctrl-C ends with one line (exit 130), the end with warnings."""
    resolve(args, args.recipe, ROLLOUT_DEFAULTS)
    out = Path(args.out)
    problems, done = _rollouts_preflight(args, out)
    print(preflight.plan(len(problems), args.samples, args.max_new_tokens, done, out, args.limit is not None),
          file=sys.stderr)
    start = time.perf_counter()
    try:
        model, tokenizer = _load_for_rollouts(args)
        summary = _do_rollouts(args, model, tokenizer, out, problems)
    except KeyboardInterrupt:
        print("\n" + _rollouts_interrupted(args, out, problems)[0], file=sys.stderr)
        return 130
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))
    for warning in preflight.warnings(summary, args.samples, args.max_new_tokens):
        print(warning, file=sys.stderr)
    return 0


def _load_for_rollouts(args):
    from reasonmaxxer.steering.models import load_model, load_tokenizer

    if args.backend == "vllm":  # vLLM loads the weights itself
        return None, load_tokenizer(args.model)
    return load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))


def _check_sources(meta: dict, val) -> None:
    """Before any model work: training rollouts and validation rows (`val`, or None) read no evaluation rows,
    and are disjoint."""
    from .problems import check_not_evaluation

    check_not_evaluation(meta.get("problems", {}), "the training rollouts' problem selection")
    if val is not None:
        check_not_evaluation(val.selection, "the validation split")
        _check_val_disjoint(meta, val)


def _check_val_disjoint(meta: dict, val) -> None:
    train = meta.get("problems", {})
    if train.get("sha256") == val.selection.get("sha256"):
        shared = set(train.get("indices", [])) & set(val.selection.get("indices", []))
        if shared:
            raise ValueError(
                f"the validation problems share {len(shared)} rows with the training rollouts' problems: "
                "pick another file or a disjoint --val-offset/--val-limit range"
            )


def _fit_preflight(args):
    """Everything `fit` can check before a model loads: flags, output folder, model names, the rollout file or
    the problems, the validation split. Returns (FitArgs, rollout path, validation problems or None, (meta,
    records) of the rollout file or None when `--problems` makes it first)."""
    from reasonmaxxer.steering.models import check_model_spec

    from .rollouts import load_rollouts, resume_check

    if not args.rollouts and not args.problems:
        raise ValueError("fit needs --rollouts R.jsonl (from `reasonmaxxer rollouts`) or --problems FILE")
    fit_args = _fit_args(args)
    resolve(args, args.recipe, ROLLOUT_DEFAULTS)
    if args.tau_sweep and not args.val_problems:
        raise ValueError("--tau-sweep keeps the tau that does best on validation: add --val-problems FILE "
                         "(with --val-offset/--val-limit; a training pool, disjoint from the rollouts)")
    preflight.check_output(args.out, "dir")
    preflight.check_sampling(args)
    rollouts = Path(args.rollouts or Path(args.out).with_suffix(".rollouts.jsonl"))
    val = _load_problems(args, prefix="val_") if args.val_problems else None  # read once, checked first
    problems = _load_problems(args) if args.problems else None
    loaded = None if problems else load_rollouts(rollouts)  # --problems: checked again once the file is made
    _check_sources(loaded[0] if loaded else {"problems": problems.selection}, val)
    for spec in (args.model, *([args.teacher] if args.teacher else [])):
        check_model_spec(spec)
    if loaded:
        return fit_args, rollouts, val, loaded
    done = resume_check(rollouts, problems, _rollout_config(args))
    print(preflight.plan(len(problems), args.samples, args.max_new_tokens, done, rollouts, args.limit is not None),
          file=sys.stderr)
    return fit_args, rollouts, val, None


def run_fit_command(args) -> int:
    """Check, (sample the rollouts,) score, fit, validate, save. Ctrl-C ends with one line that says what is kept
    and how to resume (exit 130)."""
    fit_args, rollouts, val, loaded = _fit_preflight(args)
    try:
        return _fit(args, fit_args, rollouts, val, loaded)
    except KeyboardInterrupt:
        from .rollouts import load_rollouts

        if loaded is None and args.problems:
            line, complete = _rollouts_interrupted(args, rollouts, _load_problems(args))
            if not complete:
                print("\n" + line, file=sys.stderr)
                return 130
        n = len((loaded or load_rollouts(rollouts))[1])
        cache = (f"; the scores done so far are cached in {args.score_cache}" if args.score_cache else
                 " (add --score-cache DIR to keep scores across runs)")
        print(f"\ninterrupted: the fit was stopped before it saved {args.out}; the {n:,} rollouts in {rollouts} are "
              f"kept{cache}; run the same command to resume: {shlex.join(_command(args))}", file=sys.stderr)
        return 130


def _command(args) -> list[str]:
    """The command as typed, for the "run the same command to resume" lines."""
    return ["reasonmaxxer", *getattr(args, "argv", sys.argv[1:])]


def _rollouts_interrupted(args, out: Path, problems) -> tuple[str, bool]:
    """The Ctrl-C line of a rollout run (what `out` keeps, the command that resumes), and whether it is complete."""
    from .rollouts import resume_check

    kept, total = resume_check(out, problems, _rollout_config(args)), len(problems) * args.samples
    return preflight.interrupted(out, kept, total, _command(args)), kept >= total


def _fit(args, fit_args, rollouts, val, loaded) -> int:
    from reasonmaxxer.steering.models import load_model, preferred_dtype

    from .fit import fit
    from .rollouts import load_rollouts

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    dtype = args.dtype or (preferred_dtype(device) if fit_args.kind == "head" else "float32")
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    if loaded is None:
        for warning in preflight.warnings(_do_rollouts(args, model, tokenizer, rollouts), args.samples,
                                          args.max_new_tokens):
            print(warning, file=sys.stderr)
        times["rollouts_s"] = time.perf_counter() - t0
        loaded = load_rollouts(rollouts)
        _check_sources(loaded[0], val)
    meta, records = loaded
    if meta["model"]["fingerprint"] != _fingerprint(model, tokenizer, args.model):
        raise ValueError(f"{rollouts} was made with model {meta['model']['name']!r}, not {args.model!r}: "
                         "fit on the model the rollouts came from")
    teacher = _load_teacher(args.teacher, tokenizer, dtype, model.device) if args.teacher else None
    validate, val_report, val_engine = _validation(args, val, model, tokenizer, fit_args)
    try:
        adapter, report = fit(model, tokenizer, records, fit_args, callback=validate,
                              provenance={"model": args.model, "command": " ".join(["reasonmaxxer", *sys.argv[1:]]),
                                          "rollouts": str(rollouts), "rollout_meta": meta, "teacher": args.teacher},
                              score_cache=args.score_cache, tau_sweep=args.tau_sweep, teacher=teacher)
    finally:
        if val_engine is not None and hasattr(val_engine, "close"):
            val_engine.close()
    adapter.manifest.metrics["validation"] = val_report
    adapter.save(args.out)
    times.update(report["times"])
    _print_summary(args.out, adapter, report, val_report, times)
    return 0


def _load_teacher(spec: str, tokenizer, dtype: str, device):
    """The teacher's model for `fit --teacher`, after checking (by its tokenizer alone) that it shares the base's
    vocabulary and special tokens; ValueError saying what differs."""
    from reasonmaxxer.steering.models import load_model, load_tokenizer
    from reasonmaxxer.steering.teacher import check_vocabulary

    check_vocabulary(tokenizer, load_tokenizer(spec), f"--teacher {spec}: it cannot teach this model")
    return load_model(spec, dtype=dtype, device=str(device))[0]


def _fingerprint(model, tokenizer, name: str) -> str:
    from reasonmaxxer.steering.manifest import base_identity

    return base_identity(model, tokenizer, name).fingerprint


def _val_engine(args, model, tokenizer, fit_args: FitArgs):
    """The engine that scores checkpoints: the embedded one (a separate bf16 copy of the model for LoRA, which
    PEFT wraps while training), or vLLM (`--val-backend vllm`: head adapters gated or always, LoRA always)."""
    if args.val_backend == "vllm":
        from reasonmaxxer.steering.models import preferred_dtype_here, resolve_model
        from reasonmaxxer.steering.vllm.offline import VllmOfflineEngine

        if fit_args.kind == "lora" and args.val_mode != "always":
            raise ValueError("vLLM serves LoRA adapters always-on only: use --val-mode always or --val-backend "
                             "transformers")
        extra = {"dtype": preferred_dtype_here(), "max_num_seqs": args.concurrency, **(args.vllm_args or {})}
        return VllmOfflineEngine.start(str(resolve_model(args.model)), tokenizer, extra, name=args.model,
                                       lora_rank=fit_args.rank if fit_args.kind == "lora" else None)
    from reasonmaxxer.steering.engine import Engine
    from reasonmaxxer.steering.models import load_model

    val_model = model if fit_args.kind == "head" else load_model(args.model)[0]  # preferred_dtype("cpu")
    return Engine(val_model, tokenizer, name=args.model, fast=args.fast)


def _validation(args, val, model, tokenizer, fit_args: FitArgs):
    """(callback scoring each checkpoint's pass@1 on the validation split `val` in --val-mode, report,
    engine); (None, {}, None) without a validation split."""
    report: dict[str, Any] = {}
    if val is None:
        return None, report, None
    from reasonmaxxer.steering.request import SteeringParams

    from .rollouts import RolloutConfig, evaluate

    engine = _val_engine(args, model, tokenizer, fit_args)
    config = RolloutConfig(samples=args.val_samples, temperature=args.temperature, top_p=args.top_p,
                           max_new_tokens=args.max_new_tokens, seed=args.seed + 1, prompt_style=args.prompt_style,
                           concurrency=args.concurrency, stop=tuple(args.stop) if args.stop is not None else None)
    verifier = _verifier(args)
    report.update(problems=val.selection, samples=args.val_samples, mode=args.val_mode, backend=args.val_backend,
                  base=evaluate(engine, val, config, verifier.score, progress=True), checkpoints=[])

    def callback(step: int, adapter) -> float:
        engine.add_adapter(adapter)
        try:
            result = evaluate(engine, val, config, verifier.score, SteeringParams(adapter.name, args.val_mode), True)
        finally:
            engine.remove_adapter(adapter.name)
        report["checkpoints"].append({"step": step, "tau": adapter.manifest.gate.tau, **result})
        print(f"checkpoint {step} (tau {adapter.manifest.gate.tau:.2f}): validation pass@1 {result['pass@1']:.3f} "
              f"(base {report['base']['pass@1']:.3f}), fire rate {result['fire_rate']:.3%}")
        return result["pass@1"]

    return callback, report, engine


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
