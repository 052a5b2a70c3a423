"""The README and docs/ stay true to the code: the generated flag table matches LoadOptions, every
relative link and #anchor lands, the README's two quick-start commands are the ones CI runs, and
the README shows every command."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_flag_table  # noqa: E402

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "prompts" / "README.md"])
QUICK_START = ['pip install ".[demo]" && edge-llm generate -p "The capital of France is" -n 16 --temp 0',
               'pip install "torch==2.13.0" -e ".[demo,dev]" && python -m pytest -q']


def test_the_flag_table_in_docs_server_md_is_generated_from_load_options():
    text = gen_flag_table.DOC.read_text(encoding="utf-8")
    assert gen_flag_table.with_table(text, gen_flag_table.flag_table()) == text, \
        f"docs/server.md's flag table is out of date with edge_llm/load_options.py; run: {gen_flag_table.COMMAND}"


def test_the_flag_table_has_every_load_flag_and_variable():
    from edge_llm.load_options import OPTIONS

    table = gen_flag_table.flag_table()
    for name, opt in OPTIONS.items():
        for flag in (*opt.flags, *opt.off_flags):
            assert f"`{flag}`" in table, (name, flag)
        if opt.flags and opt.env_name:
            assert f"`{opt.env_name}`" in table, name


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        match = None if fence else re.match(r"^#{1,6} (.*)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_land(doc):
    broken = []
    for link in _links(doc):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in QUICK_START:
        assert command in readme, command
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install --quiet "torch==2.13.0" -e ".[demo,dev]"' in ci_run
    assert "python -m pytest -q" in ci_run
    plain = (ROOT / ".ci" / "plain-install").read_text(encoding="utf-8")
    assert 'pip install --quiet "$repo[demo]"' in plain
    assert '"$edge_llm" generate -p "The capital of France is"' in plain


def test_the_readme_shows_every_command_and_stays_a_front_door():
    from edge_llm.cli import COMMANDS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in COMMANDS if not re.search(rf"^edge-llm {name}\b", readme, re.MULTILINE)]
    assert not missing, f"no example of these commands in README.md: {missing}"
    assert len(readme.splitlines()) <= 350, "README.md is the front door: the reference goes in docs/"
