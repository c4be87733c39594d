"""The documentation points only at what exists: every relative link in README.md, CHANGELOG.md
and docs/*.md resolves to a file (and its #anchor to a heading there), and every repository path
the text names (`docs/...`, `tests/...`, `bench/...`, ...) is in the tree. README stays short
for those who install and run the proxy; the long form it links to lists every config key and
every metric."""
import re

import pytest

from conftest import ROOT, psp

DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path in the tree as the text names it: a top-level directory, then name characters.
TOP_DIRS = "|".join(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                           and p.name not in ("dist", "demo-run", "wheels", "__pycache__")))
MENTION = re.compile(rf"(?<![\w./-])((?:{TOP_DIRS})/[\w./-]*)")


def github_anchor(heading):
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to `-`."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            anchor = github_anchor(heading.group(1))
            found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return found


def relative_links(path):
    for target in LINK.findall(path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_the_anchor_rule_matches_githubs():
    assert github_anchor("Disk temperatures (SMART)") == "disk-temperatures-smart"
    assert github_anchor("Reading the cluster: group www-data") == "reading-the-cluster-group-www-data"
    assert github_anchor("The original's config") == "the-originals-config"
    assert github_anchor("`keys` and rotation") == "keys-and-rotation"


def test_a_broken_link_and_a_missing_path_are_found(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Here\n[a](missing.md) [b](#here) [c](#gone) see docs/nothing.md\n")
    assert list(relative_links(doc)) == ["missing.md", "#here", "#gone"]
    assert anchors(doc) == {"here"}
    assert MENTION.findall(doc.read_text()) == ["docs/nothing.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_mentioned_exists(document):
    missing = sorted({path for path in MENTION.findall(document.read_text())
                      if not (ROOT / path.rstrip(".")).exists()})
    assert not missing, missing


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines; move the long form to docs/"


def test_readme_names_the_command_ci_runs():
    command = (ROOT / ".ci" / "run").read_text().splitlines()[-1].removeprefix("exec ")
    assert f"`{command}`" in (ROOT / "README.md").read_text()


def documented_names(path):
    """The backquoted names in the first column of a document's tables."""
    names = set()
    for line in path.read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_every_config_key_is_documented():
    missing = sorted(set(psp.CONFIG_CHECKS) - documented_names(ROOT / "docs" / "configuration.md"))
    assert not missing, missing


def test_every_metric_is_documented():
    missing = sorted(set(psp.new_metrics().families) - documented_names(ROOT / "docs" / "operations.md"))
    assert not missing, missing
