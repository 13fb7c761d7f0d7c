"""LoRA fitting (the paper's adapter): PEFT LoRA trained with the decision-point loss.

Contract: `fit_lora(model, tokenizer, items, tau, args, callback)` wraps `model` with a PEFT LoRA
(r, alpha, dropout 0, target modules from `args`), trains it with the shared loop of `loop.py`, where each
sequence costs one forward with the adapter (with gradients) and one without (the base logits of the
anchor, no gradients), and returns the best checkpoint as a `LoraAdapter` built from the very files PEFT
writes (`save_pretrained`). The model is unwrapped again (`unload`, no merge) before returning, so the
caller gets its base model back unchanged.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from reasonmaxxer.steering.adapters import LoraAdapter
from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity

from . import loop
from .loss import decision_loss, kl_anchor

__all__ = ["fit_lora"]


def _autocast(device: torch.device, dtype: str):
    if dtype == "none":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"--autocast {dtype!r}: use none or bfloat16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _lora_loss(peft_model, kl_weight: float, autocast: str = "none"):
    def seq_loss(item):
        ids = torch.tensor([item.ids], device=peft_model.device)  # (1, S)
        with torch.no_grad(), peft_model.disable_adapter(), _autocast(ids.device, autocast):
            base = peft_model(input_ids=ids).logits[0, :-1].float()  # (P, V)
        with _autocast(ids.device, autocast):
            logits = peft_model(input_ids=ids).logits[0, :-1].float()  # (P, V)
        logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # (P,)
        dec = decision_loss(logp, item.decision.to(logp.device), item.advantage)
        anc = kl_anchor(base, logits, item.anchor.to(logp.device))
        return dec + kl_weight * anc, dec.detach(), anc.detach()

    return seq_loss


def _snapshot(peft_model, manifest: Manifest) -> LoraAdapter:
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        manifest.save(tmp)
        return LoraAdapter.load(Path(tmp))


def fit_lora(model, tokenizer, items, tau: float, args, callback,
             loss=None) -> tuple[LoraAdapter, list[dict], dict[str, Any]]:
    """Train a LoRA with PEFT; `loss(peft_model, autocast)` makes the per-sequence loss (default: the
    contrastive one, `_lora_loss`; `autocast` is a no-argument context manager factory)."""
    from peft import LoraConfig, get_peft_model

    identity = base_identity(model, tokenizer)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=list(args.lora_targets), bias="none"
    )
    peft_model = get_peft_model(model, config)
    manifest = Manifest(kind="lora", name=args.name, base_model=identity, gate=GateSpec(tau=tau), top_k=args.top_k,
                        params={"r": args.rank, "lora_alpha": args.lora_alpha, "targets": list(args.lora_targets)})
    params = [p for p in peft_model.parameters() if p.requires_grad]
    best: dict[str, Any] = {}

    def on_checkpoint(step: int) -> None:
        adapter = _snapshot(peft_model, manifest)
        value = callback(step, adapter) if callback else None
        if not best or value is None or (best["value"] is not None and value > best["value"]):
            best.update(step=step, value=value, adapter=adapter)

    try:
        peft_model.train()
        seq_loss = (loss(peft_model, lambda: _autocast(peft_model.device, args.autocast)) if loss
                    else _lora_loss(peft_model, args.kl_weight, args.autocast))
        history = loop.run(params, items, args, seq_loss, on_checkpoint, "fit lora")
    finally:
        peft_model.eval()
        peft_model.unload()
    return best["adapter"], history, {"step": best["step"], "value": best["value"]}
