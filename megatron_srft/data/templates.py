"""Prompt templates: how a :class:`~megatron_srft.data.dataset.Problem`'s prompt becomes the model's input text.

``TEMPLATES`` (name -> one-line description; ``data.template`` picks one):

- ``chat``: the messages through the tokenizer's chat template as they are, with the generation prompt.
- ``paper``: the SRFT setup: a system instruction asking for the reasoning inside ``<think>\\n ... </think>\\n``
  and then a solution with the final answer in ``\\boxed{}`` (pair it with ``require_think`` in the reward).
  A prompt that already holds a system message (the verl/LUFFY files do) keeps its own.
- ``boxed``: the user message plus "reason step by step, final answer in \\boxed{}", through the chat template.
- ``plain``: the raw prompt string (a chat prompt's message contents joined by blank lines); no chat template.

A string prompt counts as one user message. Without a chat template on the tokenizer, ``paper`` and ``boxed``
join the message contents by blank lines (base-model style); ``chat`` is an error there.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError  # transformers renders chat templates with it; the sandbox's SecurityError is one

from ..errors import UserError, first_line

#: Our wording of the SRFT/LUFFY system instruction.
PAPER_SYSTEM_PROMPT = (
    "Solve the problem by reasoning carefully before you answer. First write your reasoning in the form "
    "\"<think>\n {reasoning} </think>\n\": work through the problem step by step, try approaches, check "
    "intermediate results and correct any mistakes you find. After \"</think>\n\", give a concise final "
    "solution that follows from your reasoning, and put the final answer in \\boxed{}."
)

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: dict[str, str] = {
    "chat": "the tokenizer's chat template as is (add_generation_prompt)",
    "paper": "SRFT system prompt: <think> reasoning </think> then the answer in \\boxed{}",
    "boxed": "reason step by step, final answer in \\boxed{}",
    "plain": "the raw prompt string",
}

#: Templates whose reward should insist on the think tags.
THINKING_TEMPLATES = frozenset({"paper"})


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _join(messages: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def template_messages(prompt, template: str) -> list[dict]:
    """The chat messages that ``template`` sends (before any chat template is applied)."""
    msgs = _as_messages(prompt)
    if template == "paper":
        if not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}] + msgs
    elif template == "boxed":
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last_user]["content"] = msgs[last_user]["content"].rstrip() + "\n" + BOXED_INSTRUCTION
    return msgs


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"data.template: unknown template '{template}' (expected one of {', '.join(TEMPLATES)})")


def render_prompt(problem, tokenizer, template: str) -> str:
    """The prompt text the model sees (``problem`` is a Problem or anything with a ``prompt`` attribute)."""
    _check(template)
    msgs = template_messages(problem.prompt, template)
    if template == "plain":
        return problem.prompt if isinstance(problem.prompt, str) else _join(msgs)
    if getattr(tokenizer, "chat_template", None) is None:
        if template == "chat":
            raise UserError("data.template: 'chat' needs a tokenizer with a chat template; this one has none "
                            "(use 'plain', 'boxed' or 'paper')")
        return _join(msgs) + "\n\n"
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise UserError(f"{_template_file(tokenizer)}: the chat template failed ({e.__class__.__name__}: "
                        f"{first_line(e, 200, empty='')}); templates run sandboxed and may not "
                        f"call Python; fix the template or use data.template=plain") from None


def _template_file(tokenizer) -> str:
    """Where a tokenizer's chat template came from, for an error message."""
    d = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (d / name).is_file():
            return str(d / name)
    return f"{d} (chat template)"


def load_tokenizer(model_dir):
    """The tokenizer of an HF model directory, as its ``tokenizer_config.json`` declares it.

    transformers 5's ``AutoTokenizer`` replaces a generic tokenizer (``tokenizer_class`` TokenizersBackend /
    PreTrainedTokenizerFast) by the model family's own class when config.json says e.g. qwen2, and that class
    rebuilds the pre-tokenizer: our character tokenizer then silently drops spaces and newlines. A generic
    class is therefore loaded as itself; anything else goes through ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # lazy: keeps transformers out of `srft config`

    cfg_path = Path(model_dir) / "tokenizer_config.json"
    declared = None
    if cfg_path.is_file():
        try:
            tok_cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"{cfg_path}: not valid JSON ({first_line(e, 120, empty='')}); "
                            f"the tokenizer cannot be loaded") from None
        if not isinstance(tok_cfg, dict):
            raise UserError(f"{cfg_path}: expected a JSON object; the tokenizer cannot be loaded")
        declared = tok_cfg.get("tokenizer_class")
    try:
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:  # a damaged tokenizer.json and the like
        raise UserError(f"{model_dir}: cannot load the tokenizer ({e.__class__.__name__}: "
                        f"{first_line(e, 200, empty='')})") from e


def encode_prompt(problem, tokenizer, template: str) -> list[int]:
    """Token ids of :func:`render_prompt`. A chat template writes its own special tokens (BOS included), so
    they are not added again; ``plain`` text gets the tokenizer's usual special tokens (e.g. a BOS)."""
    text = render_prompt(problem, tokenizer, template)
    return list(tokenizer(text, add_special_tokens=prompt_adds_special_tokens(tokenizer, template))["input_ids"])


def prompt_adds_special_tokens(tokenizer, template: str) -> bool:
    """Whether encoding the rendered prompt adds the tokenizer's special tokens (only when no chat template ran)."""
    return template == "plain" or getattr(tokenizer, "chat_template", None) is None
