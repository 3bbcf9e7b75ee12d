"""The report's one table renderer and one page shell (heads/report/page.py), and the one `backbone@tag` label."""

import csv
import io

from iqa.cache.location import backbone_label
from iqa.heads.report.page import html_page, text_table
from iqa.heads.report.profile import ProfileRow, profile_table


def test_csv_cells_with_commas_quotes_and_line_breaks_read_back_as_written():
    header = ["backbone", "note"]
    rows = [["dinov2@tiny", 'weights "random", seeded'], ["nss", "two\nlines"], ["clip", "1,234"]]
    text = text_table(header, rows, "csv")
    assert list(csv.reader(io.StringIO(text))) == [header, *rows]
    assert text.startswith("backbone,note\n") and "\r" not in text


def test_profile_csv_is_real_csv():
    """Table S5's CSV quoted a comma but not a quote inside a cell: a note with both broke its columns."""
    row = ProfileRow("resnet152", "baseline", resolution=512, backbone_params=60_000_000, backbone_macs=11e9,
                     attention_macs=None, peak_memory="n/a", weights='registry "full-size", random init',
                     head_params=1_234_567, head_macs=2_000_000, note="")
    header, line = list(csv.reader(io.StringIO(profile_table([row], "csv"))))
    assert len(line) == len(header) == 11
    assert line[header.index("head params")] == "1,234,567"
    assert line[header.index("backbone weights")] == 'registry "full-size", random init'


def test_html_page_escapes_the_title_and_keeps_the_body_in_order():
    page = html_page("a <b> & c", "td{color:red}", ["<h1>one</h1>", "<p>two</p>"])
    lines = page.splitlines()
    assert lines[0] == "<!DOCTYPE html>" and "<title>a &lt;b&gt; &amp; c</title>" in lines[1]
    assert lines[2] == "<style>td{color:red}</style></head><body>"
    assert lines[3:] == ["<h1>one</h1>", "<p>two</p>", "</body></html>"] and page.endswith("\n")


def test_backbone_label_names_a_tag_only_when_there_is_one():
    assert backbone_label("dinov2", "tiny") == "dinov2@tiny"
    assert backbone_label("siglip2", "lora-r4-sig-s8") == "siglip2@lora-r4-sig-s8"
    assert backbone_label("nss") == backbone_label("nss", None) == backbone_label("nss", "") == "nss"
