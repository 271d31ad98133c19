"""Documentation that code points at exists: every "docs/algorithms.md section N" cited in the
sources names a section of docs/algorithms.md."""

from __future__ import annotations

import re

from testkit import ROOT


def _sections() -> set[str]:
    text = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_algorithm_section_references_resolve():
    sections = _sections()
    assert {str(k) for k in range(1, 9)} <= sections
    cited: dict[str, set[str]] = {}
    for path in sorted((ROOT / "src" / "mmfl").rglob("*.py")):
        text = " ".join(path.read_text(encoding="utf-8").split())  # refs may wrap lines
        for m in re.finditer(r"docs/algorithms\.md,? sections? ((?:\d+(?:\.\d+)?(?:, | and )?)+)",
                             text):
            for num in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
                cited.setdefault(num, set()).add(path.name)
    assert cited, "no references found: the pattern is stale"
    missing = {k: v for k, v in cited.items() if k not in sections}
    assert not missing, f"cited sections missing from docs/algorithms.md: {missing}"
    stale = [p.name for p in (ROOT / "src").rglob("*.py") if "ALGORITHMS.md" in p.read_text()]
    assert not stale, f"references to a file outside the repository: {stale}"
