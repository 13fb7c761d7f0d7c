"""Answer checking: extract a completion's final answer and compare it with the gold answer via math-verify.

Contract:

- ``last_boxed(text)`` -> content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\framebox{...}``
  (escaped ``\\{ \\}`` do not count as braces), or None.
- ``extract_answer(text, fallbacks=("boxed",))`` -> the first answer found by the named extractors, in order:
  "boxed" (``last_boxed``), "gsm8k" (after the last ``####``), "answer_is" ("the answer is X" / "Answer: X"),
  "last_number". The default is boxed only: DESIGN.md scores a missing box as wrong.
- ``Verifier(workers=2, timeout_s=5.0, fallbacks=("boxed",))``: ``score(completion, gold, truncated=False)``
  -> 1.0 or 0.0 (truncated, no answer, a wrong answer, or a check that outlives ``timeout_s`` -> 0.0);
  ``score_many(pairs, truncated=None)`` scores (completion, gold) pairs concurrently; ``check(answer, gold)``
  compares an already extracted answer. Safe to call from any thread.
  Each check runs in a worker *process* (``python -c`` of this module's ``_worker_loop``, numbered JSON
  lines over pipes) that uses math-verify's own signal timeouts in its main thread; the parent waits at most
  ``timeout_s`` and kills and restarts a worker that overruns, which truly bounds a pathological sympy
  computation (a thread cannot be stopped, and a C-level big-integer power ignores signals).
  Workers start on first use (or ``warm()``); ``close()`` (or ``with``) ends them.
- Gold answers are parsed leniently: ``$`` delimiters are dropped and the text is parsed as a boxed LaTeX
  answer, so "72", "\\frac{1}{2}" and "$\\frac{1}{2}$" all work.
- ``score`` / ``score_many`` module functions: one-off convenience wrappers around a short-lived Verifier.

Needs ``math-verify`` with ``antlr4-python3-runtime==4.13.2`` (imported only inside the worker processes).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)\s*\{")
_ANSWER_IS_RE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_STARTUP_TIMEOUT_S = 120.0
_WORKER_MEMORY_BYTES = 4 << 30


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the brace group whose content starts at ``start``, else None."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox``/``\\framebox``) in ``text``, else None."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        end = _balanced_end(text, match.end())
        if end is not None:
            return text[match.end() : end - 1].strip()
    return None


def _after_hashes(text: str) -> str | None:
    if "####" not in text:
        return None
    rest = text.rsplit("####", 1)[1].strip().splitlines()
    return rest[0].strip().replace(",", "") if rest and rest[0].strip() else None


def _answer_is(text: str) -> str | None:
    matches = _ANSWER_IS_RE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().rstrip(".").strip()
    inner = last_boxed(answer)
    return (inner if inner is not None else _DOLLAR_RE.sub("", answer).strip()) or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# Answer extractors by the name `--verifier-fallbacks` gives them, in the order the help lists them.
EXTRACTORS = {"boxed": last_boxed, "gsm8k": _after_hashes, "answer_is": _answer_is, "last_number": _last_number}


def extract_answer(text: str, fallbacks: Sequence[str] = ("boxed",)) -> str | None:
    """The answer found by the first of ``fallbacks`` (extractor names, tried in order) that finds one."""
    for name in fallbacks:
        if name not in EXTRACTORS:
            raise ValueError(f"Unknown answer extractor {name!r}; use any of {', '.join(EXTRACTORS)}.")
        found = EXTRACTORS[name](text)
        if found:
            return found
    return None


def _as_boxed(answer: str) -> str:
    """An answer (gold or extracted) as a boxed LaTeX string that math-verify's boxed extraction parses."""
    inner = last_boxed(answer) if "\\boxed" in answer or "\\fbox" in answer else None
    text = _DOLLAR_RE.sub("", inner if inner is not None else answer).strip()
    return "\\boxed{" + text + "}"


def _squash(text: str) -> str:
    return "".join(_DOLLAR_RE.sub("", text).split())


def _check_in_worker(gold: str, answer: str, inner_timeout: int) -> bool:
    from math_verify import parse, verify  # only in the worker process

    gold_parsed = parse(_as_boxed(gold), parsing_timeout=inner_timeout)
    answer_parsed = parse(_as_boxed(answer), parsing_timeout=inner_timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=inner_timeout))


def _worker_loop(inner_timeout: int = 3) -> None:
    """Worker process main loop: JSON ``[seq, gold, answer]`` lines in, ``"<seq> 1|0"`` lines out.

    The protocol uses a private copy of stdout; fd 1 is pointed at stderr so that anything a library
    prints cannot corrupt the replies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent handles it
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    sys.stdout.flush()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401 - import before announcing readiness

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected; they score 0
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        seq = -1
        try:
            seq, gold, answer = json.loads(line)
            ok = _check_in_worker(gold, answer, inner_timeout)
        except Exception:  # a crash in sympy/antlr on odd input is a wrong answer, never a dead worker
            ok = False
        replies.write(f"{seq} {int(ok)}\n")
        replies.flush()


class _Worker:
    """One verifier process; used by one thread at a time (the Verifier hands workers out through a queue)."""

    def __init__(self, inner_timeout: int) -> None:
        self.inner_timeout = inner_timeout
        self.proc: subprocess.Popen | None = None
        self.seq = 0

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        code = f"from reasonmaxxer.training.verifier import _worker_loop; _worker_loop({self.inner_timeout})"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0
        )
        if self._readline(time.monotonic() + _STARTUP_TIMEOUT_S) != "ready":
            self.stop()
            raise RuntimeError(
                "The math-verify worker did not start. Install it into this environment: "
                "pip install math-verify 'antlr4-python3-runtime==4.13.2' (and check `python -c 'import math_verify'`)."
            )

    def _readline(self, deadline: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.decode(errors="replace").strip() if line else None

    def check(self, gold: str, answer: str, timeout: float) -> bool:
        """True if math-verify finds them equal within ``timeout`` seconds; overruns kill the process."""
        self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.seq += 1
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write((json.dumps([self.seq, gold, answer]) + "\n").encode())
            while (reply := self._readline(deadline)) is not None:
                seq, _, ok = reply.partition(" ")
                if seq == str(self.seq):
                    return ok == "1"
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.stop()  # overran (or died): a fresh process serves the next check
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


class Verifier:
    """Scores completions against gold answers with bounded time per check; see the module docstring."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, fallbacks: Sequence[str] = ("boxed",)) -> None:
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"workers must be >= 1 and timeout_s > 0 (got {workers}, {timeout_s}).")
        self.workers, self.timeout_s, self.fallbacks = workers, float(timeout_s), tuple(fallbacks)
        inner = max(1, int(self.timeout_s) - 1)
        self._all = [_Worker(inner) for _ in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._all:
            self._idle.put(worker)
        self._cache: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._all)

    def warm(self) -> Verifier:
        """Start every worker now (in parallel) instead of on first use."""
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda w: w.start(), self._all))
        return self

    def check(self, answer: str | None, gold: str) -> bool:
        """Whether an extracted ``answer`` equals ``gold`` (math-verify, at most ``timeout_s`` seconds)."""
        if not self._finalizer.alive:
            raise RuntimeError("This Verifier is closed; create a new one.")
        if not answer or not str(gold).strip():
            return False
        gold = str(gold)
        if _squash(answer) == _squash(gold):
            return True
        key = (gold, answer)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        worker = self._idle.get()
        try:
            ok = worker.check(gold, answer, self.timeout_s)
        finally:
            self._idle.put(worker)
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = ok
        return ok

    def score(self, completion: str, gold: str, truncated: bool = False) -> float:
        """1.0 if the completion's answer equals ``gold``; 0.0 if wrong, missing, truncated or timed out."""
        if truncated:
            return 0.0
        return 1.0 if self.check(extract_answer(completion, self.fallbacks), gold) else 0.0

    def score_many(
        self, pairs: Iterable[tuple[str, str]], truncated: Sequence[bool] | None = None
    ) -> list[float]:
        """``score`` of each (completion, gold) pair, ``workers`` at a time, in input order."""
        pairs = list(pairs)
        flags = list(truncated) if truncated is not None else [False] * len(pairs)
        if len(flags) != len(pairs):
            raise ValueError(f"truncated has {len(flags)} flags for {len(pairs)} pairs.")
        jobs = [(completion, gold, flag) for (completion, gold), flag in zip(pairs, flags, strict=True)]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.score(*job), jobs))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score(completion: str, gold: str, truncated: bool = False, timeout_s: float = 5.0) -> float:
    """One-off ``Verifier.score`` (starts and ends a worker; keep a Verifier for many calls)."""
    if truncated or extract_answer(completion) is None:
        return 0.0
    with Verifier(workers=1, timeout_s=timeout_s) as verifier:
        return verifier.score(completion, gold)


def score_many(
    pairs: Iterable[tuple[str, str]], workers: int = 2, truncated: Sequence[bool] | None = None,
    timeout_s: float = 5.0,
) -> list[float]:
    """One-off ``Verifier.score_many`` with ``workers`` worker processes."""
    with Verifier(workers=workers, timeout_s=timeout_s) as verifier:
        return verifier.score_many(pairs, truncated)
