"""Problems (JSONL / Parquet, our layout or verl/LUFFY's), prompt templates, and tokenization."""

from .dataset import DataError, Problem, TokenizedProblem, TokenizedProblems, load_problems, tokenize_problems
from .templates import TEMPLATES, THINKING_TEMPLATES, encode_prompt, load_tokenizer, render_prompt

__all__ = ["DataError", "Problem", "TokenizedProblem", "TokenizedProblems", "load_problems", "tokenize_problems",
           "TEMPLATES", "THINKING_TEMPLATES", "encode_prompt", "load_tokenizer", "render_prompt"]
