"""Problems from JSONL or Parquet, in our layout or the verl/LUFFY layout, and their tokenization.

Two row layouts are read as they are (a file may even mix them):

- ours: ``prompt`` (a string, or a list of chat messages ``{"role", "content"}``), ``answer`` (string; an integer
  is accepted and turned into its decimal string), optional ``demonstration`` (string), optional ``data_source``.
- verl/LUFFY: ``prompt`` (chat messages), ``reward_model.ground_truth``, optional ``target`` (chat messages; the
  demonstration is ``target[0].content``), ``data_source``; other columns (``ability``, ``extra_info``) are ignored.

A malformed row stops loading with ``<file>:<line> (row <i>): <field>: <what was expected>``: nothing is
silently skipped, because a quietly shrunken training set is worse than a loud error. Over-long problems
are filtered where their length is known: in :func:`tokenize_problems`, which counts what it drops.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ..errors import UserError, first_line
from .templates import prompt_adds_special_tokens, render_prompt

Messages = list[dict[str, str]]
PromptType = Union[str, Messages]
_ROLES = ("system", "user", "assistant")
_TOKENIZE_BATCH = 1024


class DataError(UserError):
    """A malformed data file or row; one line naming file, line/row and field."""


@dataclass
class Problem:
    """One prompt with its reference answer and optional demonstration.

    ``source`` is ``"<file>:<line>"`` (JSONL, 1-based line) or ``"<file>:row <i>"`` (Parquet, 0-based row),
    for error messages downstream.
    """

    prompt: PromptType
    answer: str
    demonstration: Optional[str]
    data_source: str
    source: str


@dataclass
class TokenizedProblem:
    """``prompt_ids``: the rendered prompt's token ids (template applied). ``demo_ids``: the demonstration's
    response tokens including the final EOS (None when the problem has no demonstration)."""

    prompt_ids: list[int]
    demo_ids: Optional[list[int]]
    answer: str
    data_source: str
    source: str = ""


class TokenizedProblems(list):
    """A list of :class:`TokenizedProblem` that also says how many problems the length filters dropped, and why
    (:meth:`drop_summary`, for the start-up summary)."""

    num_dropped_prompt: int = 0
    num_dropped_demo: int = 0
    max_prompt_length: int = 0
    max_response_length: int = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.dropped: list[tuple[str, str]] = []  # (source "file:line", reason), in file order

    @property
    def num_dropped(self) -> int:
        return self.num_dropped_prompt + self.num_dropped_demo

    def drop_summary(self, max_examples: int = 3) -> str:
        """One line: how many problems were dropped, for which reason, and the first few by file and line
        ("" when none was dropped)."""
        if not self.num_dropped:
            return ""
        parts = []
        if self.num_dropped_prompt:
            parts.append(f"{self.num_dropped_prompt} with a prompt over data.max_prompt_length="
                         f"{self.max_prompt_length} tokens")
        if self.num_dropped_demo:
            parts.append(f"{self.num_dropped_demo} with a demonstration over data.max_response_length="
                         f"{self.max_response_length} tokens")
        examples = "; ".join(f"{src} ({why})" for src, why in self.dropped[:max_examples])
        more = ", ..." if len(self.dropped) > max_examples else ""
        return f"{self.num_dropped} dropped: {', '.join(parts)} (e.g. {examples}{more})"


# --------------------------------------------------------------------------------------------- row parsing


def _bad(where: str, field: str, msg: str) -> DataError:
    return DataError(f"{where}: {field}: {msg}")


def _messages(value: Any, where: str, field: str) -> Messages:
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise _bad(where, field, f"expected a non-empty list of chat messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(where, f"{field}[{i}]", f"expected a message {{role, content}}, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _bad(where, f"{field}[{i}].role", f"expected one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _bad(where, f"{field}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict, where: str) -> PromptType:
    if "prompt" not in row or row["prompt"] is None:
        raise _bad(where, "prompt", "missing field")
    p = row["prompt"]
    if isinstance(p, str):
        if not p.strip():
            raise _bad(where, "prompt", "empty string")
        return p
    msgs = _messages(p, where, "prompt")
    if not any(m["role"] == "user" for m in msgs):
        raise _bad(where, "prompt", "chat messages hold no user message")
    return msgs


def _answer(row: dict, where: str) -> str:
    if "answer" in row and row["answer"] is not None:
        a = row["answer"]
        field = "answer"
    elif isinstance(row.get("reward_model"), dict) and row["reward_model"].get("ground_truth") is not None:
        a = row["reward_model"]["ground_truth"]
        field = "reward_model.ground_truth"
    else:
        raise _bad(where, "answer", "missing field (our layout: 'answer'; verl layout: 'reward_model.ground_truth')")
    if isinstance(a, int) and not isinstance(a, bool):
        a = str(a)
    if not isinstance(a, str):
        raise _bad(where, field, f"expected a string, got {type(a).__name__}")
    if not a.strip():
        raise _bad(where, field, "empty answer")
    return a


def _demonstration(row: dict, where: str, require_demo: bool) -> Optional[str]:
    if row.get("demonstration") is not None:
        d, field = row["demonstration"], "demonstration"
        if not isinstance(d, str):
            raise _bad(where, field, f"expected a string, got {type(d).__name__}")
    elif row.get("target") is not None:
        field = "target"
        msgs = _messages(row["target"], where, field)
        d, field = msgs[0]["content"], "target[0].content"
    else:
        if require_demo:
            raise _bad(where, "demonstration", "missing field (our layout: 'demonstration'; verl layout: 'target'); "
                       "this run needs a demonstration for every prompt")
        return None
    if not d.strip():
        raise _bad(where, field, "empty demonstration")
    return d


def parse_row(row: Any, where: str, *, default_source: str, require_demo: bool = False) -> Problem:
    """One row (a dict from JSON or Parquet) -> :class:`Problem`; ``where`` is ``file:line`` for errors."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    ds = row.get("data_source")
    if ds is None:
        ds = default_source
    elif not isinstance(ds, str) or not ds:
        raise _bad(where, "data_source", f"expected a non-empty string, got {ds!r}")
    return Problem(prompt=_prompt(row, where), answer=_answer(row, where),
                   demonstration=_demonstration(row, where, require_demo), data_source=ds, source=where)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"data files must be UTF-8 encoded") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: nested too deeply to be a problem (JSON arrays/objects more than "
                                f"{sys.getrecursionlimit()} levels deep)") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    # lazy (here and in fingerprint): pyarrow and numpy add ~0.1 s to every command that reads data/'s tables
    # (`srft config`, `srft generate --help`), most of which never open a Parquet file
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e.__class__.__name__}: {first_line(e, empty='')})") \
            from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{path}:row {row}", rec
            row += 1


def load_problems(path: str | Path, *, require_demo: bool = False) -> list[Problem]:
    """Read every row of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file.

    ``data_source`` defaults to the file's stem. Raises :class:`DataError` (one line: file, line/row, field).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _iter_jsonl(p)
    elif suffix == ".parquet":
        rows = _iter_parquet(p)
    else:
        raise DataError(f"{p}: unsupported data file type '{suffix}' (expected .jsonl or .parquet)")
    problems = [parse_row(r, where, default_source=p.stem, require_demo=require_demo) for where, r in rows]
    if not problems:
        raise DataError(f"{p}: no rows")
    return problems


_FINGERPRINTS: dict[tuple, dict] = {}  # (real path, size, mtime_ns) -> fingerprint: hashed once per process


def fingerprint(path: str | Path) -> dict:
    """What identifies a data file's contents for an exact resume: ``{"rows", "bytes", "crc32"}`` (rows: non-blank
    lines of a JSONL file, rows of a Parquet file). A missing file is ``{"missing": true}``."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"missing": True}
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        crc = 0
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(chunk, crc)
        if p.suffix.lower() == ".parquet":
            try:
                import pyarrow.parquet as pq

                rows = pq.ParquetFile(p).metadata.num_rows
            except Exception:  # unreadable: loading it says why; the size and checksum still identify it
                rows = -1
        else:  # non-blank lines (a missing final newline still counts its line)
            with open(p, "rb") as f:
                rows = sum(1 for line in f if line.strip())
        _FINGERPRINTS[key] = {"rows": rows, "bytes": st.st_size, "crc32": f"{crc:08x}"}
    return dict(_FINGERPRINTS[key])


# --------------------------------------------------------------------------------------------- tokenization


def encode_demo(demonstration: str, tokenizer) -> list[int]:
    """The demonstration's response tokens, ending in EOS (the rollout engine stops at EOS too)."""
    ids = list(tokenizer(demonstration, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def tokenize_problems(problems: list[Problem], tokenizer, template: str, max_prompt_length: int,
                      max_response_length: int) -> TokenizedProblems:
    """Render (``templates.render_prompt``) and tokenize; drop problems whose prompt has more than
    ``max_prompt_length`` tokens or whose demonstration (with EOS) has more than ``max_response_length``.
    The counts of dropped problems are on the returned list (``num_dropped_prompt``, ``num_dropped_demo``)."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer: has no eos_token; demonstrations must end in EOS")
    out = TokenizedProblems()
    out.max_prompt_length, out.max_response_length = max_prompt_length, max_response_length
    # batched calls: the fast tokenizer encodes a list in parallel (46k demos of up to 8k tokens take minutes
    # one by one)
    for start in range(0, len(problems), _TOKENIZE_BATCH):
        chunk = problems[start: start + _TOKENIZE_BATCH]
        texts = [render_prompt(pr, tokenizer, template) for pr in chunk]
        prompt_ids = tokenizer(texts, add_special_tokens=prompt_adds_special_tokens(tokenizer, template))["input_ids"]
        demos = [pr.demonstration for pr in chunk if pr.demonstration is not None]
        demo_iter = iter(tokenizer(demos, add_special_tokens=False)["input_ids"] if demos else [])
        for pr, p_ids in zip(chunk, prompt_ids):
            d_ids = None if pr.demonstration is None else list(next(demo_iter)) + [tokenizer.eos_token_id]
            if len(p_ids) > max_prompt_length:
                out.num_dropped_prompt += 1
                out.dropped.append((pr.source, f"prompt {len(p_ids)} tokens"))
            elif d_ids is not None and len(d_ids) > max_response_length:
                out.num_dropped_demo += 1
                out.dropped.append((pr.source, f"demonstration {len(d_ids)} tokens"))
            else:
                out.append(TokenizedProblem(prompt_ids=list(p_ids), demo_ids=d_ids, answer=pr.answer,
                                            data_source=pr.data_source, source=pr.source))
    return out
