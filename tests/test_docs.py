"""The documentation stays inside the repository and agrees with the code.

- every Markdown link in the README, CONTRIBUTING.md and docs/ points to a file of this repository that
  exists, and every ``#anchor`` to a heading that exists (GitHub's anchors); nothing links outside;
- no text refers to design notes that are not part of the repository;
- the README's main-job table is what the main job produces (``python -m benchmarks.readme_main_job``
  regenerates it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed with the package

from benchmarks import readme_main_job  # noqa: E402


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---- the link checker ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)", re.M)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
_BARE_URL = re.compile(r"(?:\bhttps?://|\bwww\.)\S+", re.I)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
_ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with HTML comments blanked (line numbers kept)."""
    text = _COMMENT.sub(lambda m: "\n" * m.group().count("\n"), text)
    lines, fenced = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match and (fenced is None or match.group(1) == fenced):
            fenced = match.group(1) if fenced is None else None
            lines.append("")
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a Markdown file defines: its headings (duplicates get -1, -2, ...) and HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = prose_lines(text)
    for i, line in enumerate(lines):
        heading = None
        match = _ATX.match(line)
        if match:
            heading = match.group(2)
        elif i and lines[i - 1].strip() and _SETEXT.match(line) and not _ATX.match(lines[i - 1]):
            heading = lines[i - 1]
        if heading is not None:
            base = slug(heading)
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(_HTML_ANCHOR.findall(line))
    return found


def link_targets(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link: inline, reference definitions, HTML and bare URLs."""
    targets = []
    lines = prose_lines(text)
    for number, line in enumerate(lines, 1):
        line = _INLINE_CODE.sub("", line)
        for target in _INLINE_LINK.findall(line):
            targets.append((number, target.strip("<>")))
        targets.extend((number, t) for t in _HTML_LINK.findall(line))
        stripped = _INLINE_LINK.sub("", _REFERENCE_DEF.sub("", line))
        targets.extend((number, t) for t in _BARE_URL.findall(stripped))
    for match in _REFERENCE_DEF.finditer("\n".join(lines)):
        number = "\n".join(lines)[: match.start()].count("\n") + 1
        targets.append((number, match.group(1).strip("<>")))
    return targets


def link_problems(path: Path, root: Path) -> list[str]:
    """What is wrong with the links of the Markdown file ``path`` (empty: nothing)."""
    problems = []
    where = path.relative_to(root)
    for number, target in link_targets(path.read_text()):
        at = f"{where}:{number}: {target}"
        if _SCHEME.match(target) or target.startswith(("//", "www.")):
            problems.append(f"{at}: leaves the repository")
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if file_part.startswith("/"):
            problems.append(f"{at}: an absolute path (GitHub resolves it outside the repository)")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(root):
            problems.append(f"{at}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{at}: no such file")
            continue
        if anchor:
            if resolved.suffix.lower() != ".md" or resolved.is_dir():
                problems.append(f"{at}: an anchor into a file that is not Markdown")
            elif unquote(anchor).lower() not in anchors(resolved.read_text()):
                problems.append(f"{at}: no heading or anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    problems = link_problems(path, ROOT)
    assert not problems, "broken or outgoing links:\n" + "\n".join(problems)


def test_link_checker_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text(
        "# Title\n\n## The `torch.compile` path [x](y.md)\n\n## Twice\n\n## Twice\n\nSetext\n------\n"
    )
    (tmp_path / "a.md").write_text(
        "\n".join(
            [
                "[ok](docs/b.md) [ok](docs/b.md#title) [ok](docs/b.md#the-torchcompile-path-x)",
                "[ok](docs/b.md#twice-1) [ok](docs/b.md#setext) [ok](#local) [ok](docs/)",
                "## Local",
                "[out](https://example.org) [out](../outside.md) [missing](docs/c.md)",
                "[anchor](docs/b.md#nowhere) [abs](/etc/passwd) see http://example.org/x",
                "`[in code](nowhere.md)` <!-- [in a comment](nowhere.md) -->",
                "```",
                "[in a fence](nowhere.md)",
                "```",
                "[ref]: https://example.org/ref",
            ]
        )
    )
    problems = link_problems(tmp_path / "a.md", tmp_path)
    flagged = [p.split(": ")[1] for p in problems]
    assert flagged == [
        "https://example.org",
        "../outside.md",
        "docs/c.md",
        "docs/b.md#nowhere",
        "/etc/passwd",
        "http://example.org/x",
        "https://example.org/ref",
    ], problems


# ---- no references to notes outside the repository ---------------------------------------------------------

_OUTSIDE_NOTES = re.compile(r"\bSPEC\b|\bDESIGN\.md\b|\.\./shared\b|\bshared/seeds\b")


def test_no_references_to_notes_outside_the_repository():
    texts = [*markdown_files()]
    for folder in ("dynbatch_kernels", "tests", "benchmarks", "csrc", "examples"):
        for suffix in ("*.py", "*.cpp", "*.h", "*.sh", "*.md"):
            texts.extend((ROOT / folder).rglob(suffix))
    this = Path(__file__).resolve()
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in texts
        if path.exists() and path.resolve() != this
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if _OUTSIDE_NOTES.search(line)
    ]
    assert not found, "point to docs/algorithms.md or docs/design.md instead:\n" + "\n".join(found)


# ---- the README's main-job table --------------------------------------------------------------------------


def _rows(loss: float = 0.1) -> list[dict]:
    row = {"optimizer": "lamb", "lr_rule": "none", "steps": 10, "samples": 640, "mean_batch": 64.0}
    return [{"policy": "fixed", **row, "dropped": 0, "val_loss": loss, "val_acc": 0.95}]


def test_main_job_block_round_trips_and_compares():
    here = "AVX2 on CPU A"
    block = readme_main_job.render(_rows(), here)
    cpu, rows = readme_main_job.parse(block)
    assert cpu == here and rows[0]["val_loss"] == pytest.approx(0.1) and rows[0]["steps"] == 10
    assert readme_main_job.differences(_rows(0.1004), here, block) == []
    assert readme_main_job.differences(_rows(0.102), here, block) == [
        "fixed val_loss: run gives 0.102, README has 0.1"
    ]
    for elsewhere in ("AVX512 on CPU A", "AVX2 on CPU B"):  # metrics: on the same CPU only
        assert readme_main_job.differences(_rows(0.2), elsewhere, block) == []
        more_steps = [{**_rows()[0], "steps": 12}]
        assert readme_main_job.differences(more_steps, elsewhere, block) == [
            "fixed steps: run gives 12, README has 10"
        ]
    here = readme_main_job.cpu_key()  # this machine's key survives the round trip
    assert readme_main_job.parse(readme_main_job.render(_rows(), here))[0] == here
    text = f"before\n{readme_main_job.BEGIN}\nold\n{readme_main_job.END}\nafter"
    start, end = readme_main_job.find_block(text)
    assert text[:start] == "before\n" and text[end:] == "\nafter"


def test_readme_main_job_table_matches_the_main_job():
    text = readme_main_job.README.read_text()
    start, end = readme_main_job.find_block(text)
    rows = readme_main_job.rows_of(readme_main_job.run_main_job())
    problems = readme_main_job.differences(rows, readme_main_job.cpu_key(), text[start:end])
    assert not problems, (
        "README.md's main-job table differs from the main job's output; regenerate it with "
        f"`{readme_main_job.COMMAND}`:\n" + "\n".join(problems)
    )
