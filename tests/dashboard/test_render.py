"""``markdown_escape``: a table of cases checked by hand, and markdown-it (a CommonMark parser, independent of
the escaping code) rendering every escaped case back to exactly its text, with no element but a paragraph."""

import html

import numpy as np
import polars as pl
import pytest
from markdown_it import MarkdownIt

from dashboard.render import heat_table, markdown_escape, plotly_escape, region_legend, region_score_bars

WJ = "\u2060"  # the word joiner after every colon

# (text, its escaped form, written out by hand)
CASES = [
    ("eye", "eye"),
    ("upper lip 2", "upper lip 2"),
    (
        "[Session expired – sign in again](https://evil.example)",
        rf"\[Session expired – sign in again\]\(https\:{WJ}\/\/evil\.example\)",
    ),
    ("![x](https://evil.example/a.png)", rf"\!\[x\]\(https\:{WJ}\/\/evil\.example\/a\.png\)"),
    ("<https://evil.example>", rf"\<https\:{WJ}\/\/evil\.example\>"),
    ("https://evil.example", rf"https\:{WJ}\/\/evil\.example"),  # GFM's bare-URL autolink
    ("www.evil.example", r"www\.evil\.example"),
    ("a@evil.example", r"a\@evil\.example"),
    ("*bold* _it_ **b** ~~s~~", r"\*bold\* \_it\_ \*\*b\*\* \~\~s\~\~"),
    ("<img src=x onerror=alert(1)>", r"\<img src\=x onerror\=alert\(1\)\>"),
    ("&amp; &#60;", r"\&amp\; \&\#60\;"),
    ("# Heading", r"\# Heading"),
    ("- item", r"\- item"),
    ("1. item", r"1\. item"),
    ("> quote", r"\> quote"),
    ("`code`", r"\`code\`"),
    ("| a | b |", r"\| a \| b \|"),
    ("$x^2$", r"\$x\^2\$"),
    (":material/lock: sign in", rf"\:{WJ}material\/lock\:{WJ} sign in"),
    (":red[alert] :smile:", rf"\:{WJ}red\[alert\] \:{WJ}smile\:{WJ}"),
    ("back\\slash", r"back\\slash"),
    ("two\nlines\r\n# Heading\tend", r"two lines  \# Heading end"),
    ("{braces} 'q' \"dq\" %,?", r"\{braces\} \'q\' \"dq\" \%\,\?"),
]


@pytest.mark.parametrize("text, escaped", CASES)
def test_escaped_by_hand(text, escaped):
    assert markdown_escape(text) == escaped


@pytest.mark.parametrize("text", [text for text, _ in CASES])
def test_a_commonmark_parser_reads_the_escaped_text_as_exactly_that_text(text):
    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    rendered = parser.render(markdown_escape(text)).replace(WJ, "")
    one_line = " ".join(text.replace("\r\n", "  ").replace("\r", " ").replace("\n", " ").split("\t"))
    expected = html.escape(one_line, quote=False).replace('"', "&quot;")  # markdown-it escapes & < > "
    assert rendered == f"<p>{expected}</p>\n"


def test_region_legend_colours_escaped_names():
    legend = region_legend(["eye", "[x](https://evil.example)"])
    assert legend == f":red[**eye**], :green[**\\[x\\]\\(https\\:{WJ}\\/\\/evil\\.example\\)**]"
    assert "<a" not in MarkdownIt("commonmark").render(legend)


def test_plotly_labels_carry_region_names_as_text():
    """Plotly reads tags in labels (``<a href>`` becomes a link); names go in as entities it shows as text."""
    evil = '<a href="https://evil.example">sign in</a> & more'
    assert plotly_escape(evil) == '&lt;a href="https://evil.example"&gt;sign in&lt;/a&gt; &amp; more'
    bars = region_score_bars({"Gradient": np.array([0.5, 0.25])}, ["eye", evil])
    assert [trace.name for trace in bars.data] == ["eye", plotly_escape(evil)]
    table = pl.DataFrame({"method": ["Gradient"], "eye": [1.0], evil: [2.0]})
    heat = heat_table(table, "method", (0, 3))
    assert list(heat.data[0].x) == ["eye", plotly_escape(evil)] and list(heat.data[0].y) == ["Gradient"]
