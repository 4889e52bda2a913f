import pytest

from megatron_srft.errors import UserError
from megatron_srft.data.dataset import Problem
from megatron_srft.data.templates import (BOXED_INSTRUCTION, PAPER_SYSTEM_PROMPT, TEMPLATES, encode_prompt,
                                          render_prompt)
from megatron_srft.experiments.tiny import make_char_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=128)


def P(prompt):
    return Problem(prompt, "1", None, "s", "f:1")


def test_table():
    assert set(TEMPLATES) == {"chat", "paper", "boxed", "plain"}
    assert "<think>" in PAPER_SYSTEM_PROMPT and "</think>" in PAPER_SYSTEM_PROMPT and "\\boxed{}" in PAPER_SYSTEM_PROMPT


def test_render(tok):
    assert render_prompt(P("2+3"), tok, "chat") == "Q:2+3\nA:"
    assert render_prompt(P("2+3"), tok, "plain") == "2+3"
    assert render_prompt(P("2+3"), tok, "paper") == PAPER_SYSTEM_PROMPT + "\nQ:2+3\nA:"
    assert render_prompt(P("2+3"), tok, "boxed") == "Q:2+3\n" + BOXED_INSTRUCTION + "\nA:"
    msgs = [{"role": "system", "content": "own system"}, {"role": "user", "content": "q"}]
    assert render_prompt(P(msgs), tok, "paper") == "own system\nQ:q\nA:"  # verl prompt keeps its system message
    assert render_prompt(P(msgs), tok, "plain") == "own system\n\nq"
    assert msgs[1]["content"] == "q"  # not mutated by 'boxed'
    render_prompt(P(msgs), tok, "boxed")
    assert msgs[1]["content"] == "q"


def test_encode_and_errors(tok):
    assert tok.decode(encode_prompt(P("2+3"), tok, "chat")) == "Q:2+3\nA:"
    with pytest.raises(UserError, match="unknown template 'nope'"):
        render_prompt(P("x"), tok, "nope")
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(UserError, match="'chat' needs a tokenizer with a chat template"):
            render_prompt(P("x"), tok, "chat")
        assert render_prompt(P("x"), tok, "boxed") == "x\n" + BOXED_INSTRUCTION + "\n\n"
    finally:
        tok.chat_template = saved


def test_chat_template_refused_by_the_sandbox_is_one_line_naming_the_file(tmp_path):
    from megatron_srft.data.templates import load_tokenizer

    d = tmp_path / "tok"
    make_char_tokenizer(d, vocab_size=128).save_pretrained(d)
    hostile = load_tokenizer(d)
    hostile.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # Python from a template: refused
    hostile.save_pretrained(d)
    tok = load_tokenizer(d)
    with pytest.raises(UserError) as e:
        render_prompt(P("2+3"), tok, "chat")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(str(d)) and "SecurityError" in msg, msg


def test_damaged_tokenizer_config_is_one_line_naming_it(tmp_path):
    from megatron_srft.data.templates import load_tokenizer

    d = tmp_path / "tok"
    make_char_tokenizer(d, vocab_size=128).save_pretrained(d)
    cfg = d / "tokenizer_config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(UserError, match=rf"{cfg}: not valid JSON \(.*\); the tokenizer cannot be loaded"):
        load_tokenizer(d)
