"""ministd.prompts: the web UIs' emphasis parser and weighting, windows of 75 tokens.

The parse cases are the examples of A1111's ``parse_prompt_attention``
docstring (modules/prompt_parser.py) plus the edge cases of its rule; the
pipelines' use of these functions is tested in tests/test_pipelines.py and
tests/test_sdxl_pipelines.py.
"""

import pytest
import torch

from ministd.prompts import apply_emphasis, parse_emphasis, weighted_ids, window_weights
from ministd.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_vocab_file()


def _close(got, expected):
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
])
def test_parse_matches_the_web_ui_examples(text, expected):
    _close(parse_emphasis(text), expected)


@pytest.mark.parametrize("text, expected", [
    ("a (red:1.2) [circle]", [("a ", 1.0), ("red", 1.2), (" ", 1.0), ("circle", 1 / 1.1)]),
    ("[[blurry]]", [("blurry", 1 / 1.1 ** 2)]),
    ("(red : 0.5 ) circle", [("red ", 0.5), (" circle", 1.0)]),     # spaces around the weight
    ("(red:-1) x", [("red", -1.0), (" x", 1.0)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),                              # closing without opening: text
    ("ratio 16:9, 4k", [("ratio 16:9, 4k", 1.0)]),                    # colons outside brackets: text
    ("time :1.5) here", [("time :1.5) here", 1.0)]),                  # a weight with no "(" is text
    (r"a \\ b", [("a \\ b", 1.0)]),                                   # escaped backslash
    ("", [("", 1.0)]),
    ("(red:1.0) circle", [("red circle", 1.0)]),                      # equal weights join
])
def test_parse_edge_cases(text, expected):
    _close(parse_emphasis(text), expected)


def test_bad_weight_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight '1\.2\.3'.*\(word:1\.2\)"):
        parse_emphasis("(red:1.2.3)")
    with pytest.raises(ValueError, match="str"):
        parse_emphasis(None)


def test_weighted_ids_give_each_token_its_piece_weight(tok):
    ids, weights = weighted_ids(tok, "a (red:1.5) [butterfly]")
    assert ids == tok.encode("a red butterfly", add_special_tokens=False)
    n_butterfly = len(tok.encode("butterfly", add_special_tokens=False))
    assert weights == [1.0, 1.5] + [1 / 1.1] * n_butterfly
    plain_ids, plain = weighted_ids(tok, "a (red:1.5) circle", emphasis=False)
    assert plain_ids == tok.encode("a (red:1.5) circle", add_special_tokens=False) and set(plain) == {1.0}


def test_window_weights_follow_the_tokenizer_windows():
    w = [2.0] * 80
    row = window_weights(w, None, 77)                     # truncated: BOS + 75 + EOS
    assert len(row) == 77 and row[0] == row[76] == 1.0 and set(row[1:76]) == {2.0}
    rows = window_weights(w, 3, 77)                       # 3 windows of 75
    assert len(rows) == 3 * 77
    assert rows[77] == 1.0 and set(rows[78:78 + 5]) == {2.0} and set(rows[78 + 5:]) == {1.0}


def test_emphasis_weights_then_restores_each_window_mean():
    torch.manual_seed(0)
    states = torch.randn(2, 2 * 7, 5) + 0.3
    weights = torch.ones(2, 14)
    weights[0, 2] = 1.5           # prompt 0, window 0
    weights[1, 9] = 0.5           # prompt 1, window 1
    out = apply_emphasis(states, weights, window=7)
    x, y = states.reshape(2, 2, 7, 5), out.reshape(2, 2, 7, 5)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)))
    # inside a changed window every vector is scaled by the same factor, the weighted one by 1.5 more
    factor = y[0, 0, 0] / x[0, 0, 0]
    torch.testing.assert_close(y[0, 0, 2] / x[0, 0, 2], 1.5 * factor)
    # windows with weights 1 are untouched, bit for bit
    assert torch.equal(y[0, 1], x[0, 1]) and torch.equal(y[1, 0], x[1, 0])
    assert torch.equal(apply_emphasis(states, torch.ones(2, 14), 7), states)
    with pytest.raises(ValueError, match="weights"):
        apply_emphasis(states, torch.ones(2, 13), 7)
