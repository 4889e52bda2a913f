import pytest

from megatron_srft.rewards import REWARDS, answer_part, exact_score, extract_boxed, math_score


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\boxed{7}}", "7"),  # nested boxes: the last one to open (the innermost)
    ("\\boxed{x = \\frac{1}{2}}", "x = \\frac{1}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
    ("\\boxed{a} and \\boxed{b", "a"),  # unclosed last box (cut off): the previous complete one
    ("\\fbox{3}", "3"),
    ("\\boxed {4}", "4"),
    ("no answer here", None),
    ("\\boxed{", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_answer_part():
    assert answer_part("<think>a</think>b", True) == "b"
    assert answer_part("a</think>b</think>c", True) == "c"
    assert answer_part("no tags \\boxed{1}", True) is None
    assert answer_part("no tags", False) == "no tags"


@pytest.mark.parametrize("resp,ans,think,want", [
    ("\\boxed{\\frac{1}{2}}", "0.5", False, 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", False, 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", False, 1.0),
    ("\\boxed{\\boxed{7}}", "7", False, 1.0),
    ("\\boxed{3}", "4", False, 0.0),
    ("the answer is 4", "4", False, 0.0),  # no boxed answer
    ("<think>\nhmm \\boxed{9}</think>\nSo \\boxed{4}", "4", True, 1.0),
    ("<think>\nhmm \\boxed{4}</think>\nSo \\boxed{9}", "4", True, 0.0),  # only the text after </think> counts
    ("<think> unfinished \\boxed{4}", "4", True, 0.0),  # think tags missing in thinking mode
    ("\\boxed{4}", "4", True, 0.0),
    ("\\boxed{C}", "C", False, 1.0),
    ("\\boxed{}", "4", False, 0.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", False, 1.0),
])
def test_math_score(resp, ans, think, want):
    assert math_score(resp, ans, require_think=think) == want


def test_exact_and_table():
    assert set(REWARDS) == {"math", "exact"}
    assert exact_score("1+2=3. \\boxed{3}", "3") == 1.0
    assert exact_score("\\boxed{ 3 }", "3") == 1.0
    assert exact_score("\\boxed{3.0}", "3") == 0.0  # exact, not mathematical
    assert exact_score("3", "3") == 0.0
    assert exact_score("<think>x</think>\\boxed{3}", "3", require_think=True) == 1.0
    assert exact_score("\\boxed{3}", "3", require_think=True) == 0.0
