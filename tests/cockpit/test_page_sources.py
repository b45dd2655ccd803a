"""The page's sources against Cockpit's content security policy and the rule that guest data is
text: no inline script, style or event handler, no HTML-parsing sink, nothing evaluated from a
string, and a manifest that relaxes no policy. (The browser test shows the behaviour; this finds
a sink on a path the browser test does not walk.)"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

from tests.cockpit.cockpit_harness import PAGE_SOURCE

# Ways to turn a string into markup or code in a page.
SINKS = [
    r"\.innerHTML\b",
    r"\.outerHTML\b",
    r"\binsertAdjacentHTML\s*\(",
    r"\bcreateContextualFragment\s*\(",
    r"\bDOMParser\b",
    r"\bdocument\.write(ln)?\s*\(",
    r"\beval\s*\(",
    r"\bnew\s+Function\s*\(",
    r"\bset(Timeout|Interval)\s*\(\s*[\"'`]",
    r"\.setAttribute\s*\(\s*[\"']on",
    r"\bjavascript:",
]


def read(name):
    with open(os.path.join(PAGE_SOURCE, name), encoding="utf-8") as f:
        return f.read()


def code_of(js):
    """The script without its comments (which may name what they avoid)."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", js)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_script_should_use_no_markup_sink_and_evaluate_no_string():
    code = code_of(read("hostbridge.js"))
    found = [p for p in SINKS if re.search(p, code)]
    assert found == []
    assert "textContent" in code  # what it uses instead


def test_the_html_should_hold_no_inline_script_style_or_handler():
    parser = _Tags()
    parser.feed(read("index.html"))
    scripts = [attrs.get("src") for tag, attrs in parser.tags if tag == "script"]
    assert scripts == ["../base1/cockpit.js", "../manifests.js", "hostbridge.js"]
    assert not [tag for tag, _ in parser.tags if tag == "style"]
    inline = [
        (tag, name)
        for tag, attrs in parser.tags
        for name in attrs
        if name == "style" or name.startswith("on")
    ]
    assert inline == []


def test_the_manifest_should_relax_no_policy_and_default_to_the_bridge_socket():
    manifest = json.loads(read("manifest.json"))
    assert "content-security-policy" not in json.dumps(manifest)
    assert manifest["config"]["api_socket"] == "/run/hostbridge/api.sock"
    assert set(os.listdir(PAGE_SOURCE)) == {
        "manifest.json",
        "index.html",
        "hostbridge.js",
        "hostbridge.css",
    }
