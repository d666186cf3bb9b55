"""The README: its order for a newcomer, its links, and its generated parts.

The variable table and the configuration defaults are copies of what the
package holds, so they are checked to be current. The top-level sections
follow the order a new user needs them in (issue 21), and every link to a
heading, in the README and in the Markdown files that link into it, resolves.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from speccluster_ssh.inventory import SPECCLUSTER_VARS, speccluster_vars_markdown

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# The top-level sections, in order: install first, development last.
SECTIONS = [
    "Install",
    "Quick start",
    "A first real lab",
    "Hosts with only Python",
    "Provision your lab",
    "Operating a running cluster",
    "Labs behind a bastion or a firewall",
    "Python API",
    "Reference",
    "How it works",
    "Performance",
    "Upgrade and uninstall",
    "Development",
]


def _without_code(text: str) -> str:
    """The Markdown outside fenced code blocks (a `#` in a shell block is no heading)."""
    return re.sub(r"^ *```.*?^ *```[^\n]*$", "", text, flags=re.S | re.M)


def headings(text: str) -> list[tuple[int, str]]:
    """``(level, text)`` of every ATX heading outside code blocks."""
    return [
        (len(match.group(1)), match.group(2).strip())
        for match in re.finditer(r"^(#{1,6}) +(.+?) *#* *$", _without_code(text), flags=re.M)
    ]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]{2,}|[`*]", "", heading).lower()  # emphasis and code marks, not snake_case
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text; repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in headings(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str) -> list[str]:
    """Targets of the inline Markdown links outside code blocks."""
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(text))


def test_readme_has_the_current_variable_table() -> None:
    text = README.read_text()
    assert speccluster_vars_markdown() in text, (
        "README.md's variable table is not the current one: paste the output of "
        "python3 -c 'from speccluster_ssh.inventory import speccluster_vars_markdown as m; print(m())'"
    )
    for name in SPECCLUSTER_VARS:
        assert f"`{name}`" in text


def test_readme_has_the_current_configuration_defaults() -> None:
    shipped = resources.files("speccluster_ssh").joinpath("speccluster-ssh.yaml").read_text()
    assert f"```yaml\n{shipped.rstrip()}\n```" in README.read_text(), (
        "README.md's Configuration section must hold a copy of src/speccluster_ssh/speccluster-ssh.yaml"
    )


def test_readme_sections_come_in_the_newcomer_order() -> None:
    top = [text for level, text in headings(README.read_text()) if level == 2]
    assert top == SECTIONS


def test_slug_matches_github() -> None:
    assert slug("Host keys: strict known_hosts") == "host-keys-strict-known_hosts"
    assert slug("Restart, drain, reload") == "restart-drain-reload"
    assert slug("The `run` command") == "the-run-command"
    assert anchors("# A\n## A\n```sh\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_internal_link_resolves_to_a_heading() -> None:
    text = README.read_text()
    own = anchors(text)
    broken = [link for link in links(text) if link.startswith("#") and link[1:] not in own]
    assert not broken, f"README.md links to headings it does not have: {broken}"


def test_links_between_the_markdown_files_resolve() -> None:
    """Relative links of README.md, bench/README.md and docs/: the file exists, and its heading."""
    broken = []
    for source in [README, REPO / "bench" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for link in links(source.read_text()):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue  # a URL, or a heading of the same file (checked above for README.md)
            path, _, anchor = link.partition("#")
            target = (source.parent / path).resolve()
            if not target.exists():
                broken.append(f"{source.relative_to(REPO)}: {link} (no such file)")
            elif anchor and anchor not in anchors(target.read_text()):
                broken.append(f"{source.relative_to(REPO)}: {link} (no such heading)")
    assert not broken, broken


# A transcript block: the marker names a scenario of scripts/transcripts.py and its steps.
_TRANSCRIPT = re.compile(r"^<!-- transcript: (?P<scenario>[\w-]+) (?P<steps>[\w,-]+) -->\n```\w*\n(?P<body>.*?)^```\n", re.M | re.S)


def test_every_transcript_is_real_output_of_its_scenario() -> None:
    """Each README transcript was filled by scripts/transcripts.py from its scenario's recorded run."""
    text = README.read_text()
    blocks = list(_TRANSCRIPT.finditer(text))
    assert len(blocks) >= 10, [b["scenario"] for b in blocks]
    assert text.count("<!-- transcript:") == len(blocks), "a transcript marker is not followed by a fenced block"
    for block in blocks:
        recorded = REPO / "docs" / "transcripts" / f"{block['scenario']}.txt"
        assert recorded.is_file(), f"{recorded} is missing: run scripts/transcripts.py {block['scenario']}"
        body = block["body"]
        assert body.strip(), f"the {block['scenario']} {block['steps']} transcript is empty"
        # The README shows a part of the recorded run, not text of its own.
        for line in body.splitlines():
            assert line in recorded.read_text(), (block["scenario"], line)
