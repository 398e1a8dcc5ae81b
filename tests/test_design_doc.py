"""Citations of the design document: every `docs/design.md, section N[.M]` in the package, its tests, benchmarks,
experiments and README names a section that exists, and no citation uses another form (e.g. the old
"design.md section 4", which pointed at no file of the repository)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs/design.md"
# Where the project cites its design document (docs/ links to it as a page; this file shows bad citations).
CITING = ("fedask_jax", "tests", "benchmarks", "experiments", "README.md")
SUFFIXES = {".py", ".md", ".rst", ".yaml", ".cfg", ".toml"}
CITATION = re.compile(r"docs/design\.md,\s+sections?\s+(\d+(?:\.\d+)?(?:(?:,\s*|\s+and\s+)\d+(?:\.\d+)?)*)")


def design_sections() -> set[str]:
  """ "1", "1.1", ... from the headings "## 1. Title" and "### 1.1 Title"."""
  text = DESIGN.read_text(encoding="utf-8")
  return set(re.findall(r"^## (\d+)\. ", text, re.M)) | set(re.findall(r"^### (\d+\.\d+) ", text, re.M))


def citations(text: str) -> list[tuple[int, str, list[str]]]:
  """(line, the citation, its section numbers) for every mention of design.md; a mention that is not
  `docs/design.md` or that says "section" without the form `docs/design.md, section N[.M]` gets no numbers."""
  found = []
  for mention in re.finditer(r"design\.md", text):
    line = text.count("\n", 0, mention.start()) + 1
    start = mention.start() - len("docs/")
    if text[start : mention.start()] != "docs/":
      found.append((line, text[max(0, start) : mention.end() + 20], []))
      continue
    cited = CITATION.match(text, start)
    if cited:
      found.append((line, cited.group(0), re.findall(r"\d+(?:\.\d+)?", cited.group(1))))
    elif re.match(r",?\s+sections?\b", text[mention.end() :]):
      found.append((line, text[start : mention.end() + 20], []))
  return found


def test_design_citations_name_existing_sections():
  sections = design_sections()
  assert {"1", "1.1", "2.1", "4", "5.1"} <= sections, f"docs/design.md lost its numbered headings: {sorted(sections)}"
  files = [ROOT / name for name in CITING if (ROOT / name).is_file()]
  files += [
    path
    for name in CITING
    if (ROOT / name).is_dir()
    for path in sorted((ROOT / name).rglob("*"))
    if path.suffix in SUFFIXES and path != pathlib.Path(__file__).resolve()
  ]
  bad, count = [], 0
  for path in files:
    for line, text, numbers in citations(path.read_text(encoding="utf-8")):
      count += 1
      missing = [n for n in numbers if n not in sections]
      if not numbers or missing:
        bad.append(
          f"{path.relative_to(ROOT)}:{line}: {' '.join(text.split())!r} "
          f"{'cites missing sections ' + str(missing) if missing else 'is not docs/design.md, section N'}"
        )
  assert not bad, "\n".join(bad)
  # The package cites the document about 30 times; finding none would mean this test reads nothing.
  assert count >= 20, count


@pytest.mark.parametrize(
  "text, ok",
  [
    ("see docs/design.md, section 4.3.", True),
    ("(docs/design.md,\nsections 3.3 and 4.4)", True),
    ("(docs/design.md, section 9.9)", False),
    ("(design.md section 4)", False),
    ("docs/design.md section 4", False),
  ],
)
def test_citation_check_tells_good_from_bad(text, ok):
  sections = design_sections()
  ((_, _, numbers),) = citations(text)
  assert (bool(numbers) and all(n in sections for n in numbers)) == ok
