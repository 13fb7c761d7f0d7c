"""A teacher: a second causal LM with the base model's tokenizer, consulted only where the gate fires.

Contract (DESIGN.md, "Teachers"):
- `Teacher` holds a transformers causal LM, its name and a `Manifest` of kind "teacher" (its default
  gate: `tau`, the random control's `rate`, the candidate count `top_k`), so that the server lists,
  admits, meters and reports a teacher exactly as it does an adapter. `reasonmaxxer.models.load_teacher(spec,
  ...)` loads one from a known model name or a folder; `Teacher.validate(model, tokenizer)` refuses a teacher whose
  vocabulary or special tokens differ from the served base's, saying what differs.
- Where the gate fires (on the base entropy, as for adapters), the next token is drawn from the
  teacher's distribution restricted to the base model's top-k candidates (`restrict`: every other
  logit -inf; k = 0: the teacher's full distribution), with the request's own sampling parameters and
  generator.
- `TeacherCursor` is one request's view of its teacher: a KV cache over the first `seen` tokens of the
  request's text (prompt + generated). At a fired position it prefills every token since its last fire
  in one forward (`logits`), so a teacher costs one forward per fire plus the prefill of the text it has
  not yet seen; `tokens` counts what it processed.
- `next_logits(cursors, texts)` does the same for the rows of one decode step that fired on one teacher, in
  one forward per group of similar new lengths (`batch.prefill_groups`) instead of one per row: each row's
  cache is left-padded to the group's longest, its new tokens left-padded to the group's most, a mask
  hides both paddings and positions continue each row's own; the rows' caches are cut back out after. The
  logits equal the per-row path's to float rounding (tests: the same tokens, greedy and seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .batch import forward_hidden, new_cache, prefill_groups
from .manifest import NAME, AdapterError, GateSpec, Manifest, base_identity
from .modes import DEFAULT_TOP_K

__all__ = ["PAPER_TAU", "Teacher", "TeacherCursor", "check_vocabulary", "next_logits", "restrict",
           "vocabulary_difference"]

PAPER_TAU = 1.4  # the released recipe's fixed entropy threshold (nats): a teacher's default gate


@dataclass
class Teacher:
    """A correction source that is a whole model. `manifest.kind` is "teacher"."""

    manifest: Manifest
    model: Any
    tokenizer: Any
    path: str | None = None
    lm_head: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = self.model.eval()
        self.lm_head = self.model.get_output_embeddings()

    @property
    def name(self) -> str:
        return self.manifest.name

    @classmethod
    def create(cls, model: Any, tokenizer: Any, name: str, tau: float = PAPER_TAU, rate: float | None = None,
               top_k: int = DEFAULT_TOP_K, path: str | None = None) -> Teacher:
        """A teacher named `name` with its default gate (`tau`, random `rate`, `top_k` candidates)."""
        if not (isinstance(name, str) and NAME.fullmatch(name)):
            raise AdapterError(f"teacher name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                               "(1-128 characters, starting with a letter or digit)")
        gate = GateSpec(tau=float(tau), measured_fire_rate=rate)
        manifest = Manifest(kind="teacher", name=name, base_model=base_identity(model, tokenizer, path or name),
                            gate=gate, top_k=top_k, params={"path": path})
        return cls(manifest, model, tokenizer, path)

    def validate(self, model: Any, tokenizer: Any) -> None:
        """AdapterError unless this teacher shares the base's vocabulary and special tokens exactly."""
        check_vocabulary(tokenizer, self.tokenizer, f"teacher {self.name!r} cannot steer this model")
        if self.model.device != model.device:
            raise AdapterError(f"teacher {self.name!r} is on {self.model.device} but the served model is on "
                               f"{model.device}: load both on the same device")

    def to_dict(self) -> dict[str, Any]:
        return self.manifest.to_dict()


def check_vocabulary(base: Any, teacher: Any, who: str) -> None:
    """AdapterError "`who`: what differs. ..." unless the two tokenizers share vocabulary and special tokens."""
    problem = vocabulary_difference(base, teacher)
    if problem:
        raise AdapterError(f"{who}: {problem}. A teacher must use the served model's tokenizer (the same family, "
                           "e.g. Qwen2.5-Coder-1.5B over -0.5B)")


def vocabulary_difference(base: Any, other: Any) -> str | None:
    """What differs between two tokenizers' vocabularies and special tokens (None: identical)."""
    a, b = base.get_vocab(), other.get_vocab()
    if a != b:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])
        parts = [f"the vocabularies differ ({len(a)} tokens against {len(b)}"]
        if only_a:
            parts.append(f"; {len(only_a)} only in the base, e.g. {only_a[0]!r}")
        if only_b:
            parts.append(f"; {len(only_b)} only in the teacher, e.g. {only_b[0]!r}")
        if moved:
            parts.append(f"; {len(moved)} with other ids, e.g. {moved[0]!r}: {a[moved[0]]} against {b[moved[0]]}")
        return "".join(parts) + ")"
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        x, y = getattr(base, attr, None), getattr(other, attr, None)
        if x != y:
            return f"the special tokens differ: {attr} is {x} in the base and {y} in the teacher"
    sa, sb = sorted(map(str, base.all_special_tokens)), sorted(map(str, other.all_special_tokens))
    if sa != sb:
        extra = sorted(set(sa) ^ set(sb))
        return f"the special tokens differ: {len(extra)} not in both, e.g. {extra[0]!r}"
    return None


def restrict(teacher_logits: torch.Tensor, base_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's logits on the base top-k candidates, -inf elsewhere (k = 0: all of them). (V,) -> (V,).
    The teacher's vocabulary axis is cut or padded with -inf to the base's."""
    v = base_logits.shape[-1]
    t = teacher_logits.float()[..., :v]
    if t.shape[-1] < v:
        t = torch.cat([t, t.new_full((*t.shape[:-1], v - t.shape[-1]), float("-inf"))], dim=-1)
    if k == 0:
        return t
    cand = torch.topk(base_logits.float(), min(k, v), dim=-1).indices
    out = torch.full_like(t, float("-inf"))
    return out.scatter(-1, cand, t.gather(-1, cand))


class TeacherCursor:
    """One request's teacher state: a KV cache over the first `seen` tokens of its text."""

    def __init__(self, teacher: Teacher):
        self.teacher, self.cache, self.seen, self.tokens = teacher, new_cache(), 0, 0

    def logits(self, ids: list[int]) -> torch.Tensor:
        """The teacher's next-token logits after `ids` (float32, (V_teacher,)), prefilling ids[seen:]."""
        new = ids[self.seen:]
        if not new:
            raise ValueError("the teacher has already seen every token: it needs at least one new token")
        device = self.teacher.model.device
        inputs = torch.tensor([new], dtype=torch.long, device=device)  # (1, n)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)  # (1, seen + n)
        positions = torch.arange(self.seen, len(ids), device=device)[None]  # (1, n)
        hidden = forward_hidden(self.teacher.model, inputs, mask, positions, self.cache)  # (1, d)
        self.seen, self.tokens = len(ids), self.tokens + len(new)
        return self.teacher.lm_head(hidden).float()[0]


def next_logits(cursors: list[TeacherCursor], texts: list[list[int]]) -> list[torch.Tensor]:
    """`cursor.logits(text)` for every pair (cursors of one teacher), batched: one forward per group of rows
    whose new token counts are alike. -> float32 (V_teacher,) per row, in order."""
    if len(cursors) == 1:
        return [cursors[0].logits(texts[0])]
    out: list[torch.Tensor | None] = [None] * len(cursors)
    news = [len(t) - c.seen for c, t in zip(cursors, texts, strict=True)]
    if min(news) < 1:
        raise ValueError("the teacher has already seen every token of a row: it needs at least one new token")
    for group in prefill_groups(news):
        logits = _prefill_group([cursors[i] for i in group], [texts[i] for i in group])  # (b, V_t)
        for j, i in enumerate(group):
            out[i] = logits[j]
    return out


def _prefill_group(cursors: list[TeacherCursor], texts: list[list[int]]) -> torch.Tensor:
    """One forward for these rows: [left pad | row cache | left pad | new tokens] per row, S + N columns.
    Returns the next-token logits (b, V_t) and leaves each cursor holding its own cache of the whole text."""
    teacher = cursors[0].teacher
    device = teacher.model.device
    seen = [c.seen for c in cursors]
    news = [t[c.seen:] for c, t in zip(cursors, texts, strict=True)]
    b, s, n = len(cursors), max(seen), max(len(x) for x in news)
    ids = torch.zeros((b, n), dtype=torch.long, device=device)  # (b, N), left-padded with token 0 (masked)
    mask = torch.zeros((b, s + n), dtype=torch.long, device=device)  # (b, S + N)
    positions = torch.zeros((b, n), dtype=torch.long, device=device)  # (b, N)
    for r, (k, new) in enumerate(zip(seen, news, strict=True)):
        ids[r, n - len(new):] = torch.tensor(new, device=device)
        mask[r, s - k:s] = 1
        mask[r, s + n - len(new):] = 1
        positions[r, n - len(new):] = torch.arange(k, k + len(new), device=device)
    cache = new_cache(_padded_layers(cursors, s) if s else None)
    hidden = forward_hidden(teacher.model, ids, mask, positions, cache)  # (b, d): every row's last column is real
    for r, (c, k, new) in enumerate(zip(cursors, seen, news, strict=True)):
        layers = []
        for layer in cache.layers:
            keys, values = layer.keys[r:r + 1], layer.values[r:r + 1]  # (1, H, S + N, D)
            layers.append((torch.cat([keys[:, :, s - k:s], keys[:, :, s + n - len(new):]], dim=2),
                           torch.cat([values[:, :, s - k:s], values[:, :, s + n - len(new):]], dim=2)))
        c.cache, c.seen, c.tokens = new_cache(layers), k + len(new), c.tokens + len(new)
    return teacher.lm_head(hidden).float()


def _padded_layers(cursors: list[TeacherCursor], s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows' caches stacked per layer, each left-padded with zeros to S columns: (b, H, S, D) pairs."""
    template = next(c.cache for c in cursors if c.seen)
    out = []
    for li, layer in enumerate(template.layers):
        shape = (len(cursors), layer.keys.shape[1], s, layer.keys.shape[3])
        keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
        for r, c in enumerate(cursors):
            if c.seen:
                keys[r, :, s - c.seen:] = c.cache.layers[li].keys[0]
                values[r, :, s - c.seen:] = c.cache.layers[li].values[0]
        out.append((keys, values))
    return out
