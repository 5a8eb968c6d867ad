"""The research pages' figures are the committed results': every generated section of research/results.md
and research/real_data.md (and README.md's answer) is rebuilt from the committed JSONs by
its generator into a temporary copy, and any difference with the committed page fails. No training runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from research.bench import regenerate, summary
from research.bench.report import markers, replace_section, section

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT / "research"
RESULTS = RESEARCH / "results"
PAGES = regenerate.pages(RESEARCH)


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: p.name)
def test_every_marked_section_has_a_generator_and_every_generator_a_section(page):
    """A section added to the page without a generator (typed by hand) fails, and so does a committed
    result whose section was dropped from the page."""
    names = markers(page.read_text())
    assert len(names) == len(set(names)), f"{page.name}: a section appears twice"
    assert set(names) - set(PAGES[page]) == set(), f"{page.name}: sections no generator writes"
    assert set(PAGES[page]) - set(names) == set(), f"{page.name}: generated sections missing from the page"


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: p.name)
def test_every_generated_section_is_rebuilt_from_the_committed_json(page, tmp_path):
    """Each generator's table function (its --report-only path) writes its section into a copy of the
    page; the copy must equal the committed page, prose included."""
    copy = tmp_path / page.name
    shutil.copy(page, copy)
    for name, text in PAGES[page].items():
        replace_section(copy, name, text())
    committed, rebuilt = page.read_text(), copy.read_text()
    stale = [name for name in markers(committed) if section(committed, name) != section(rebuilt, name)]
    assert stale == [], f"{page.name}: sections that differ from the JSONs (python -m research.bench.regenerate)"
    assert rebuilt == committed


def test_the_summary_writes_its_section_of_results_md_and_nothing_else(tmp_path):
    """summary.py's table (the earlier sweep's answer) goes to results.md only; README.md's answer is the
    method sweep's."""
    page = tmp_path / "results.md"
    shutil.copy(RESEARCH / "results.md", page)
    readme = (ROOT / "README.md").read_text()
    summary.main(["--results-md", str(page)])
    assert page.read_text() == (RESEARCH / "results.md").read_text() and (ROOT / "README.md").read_text() == readme
    assert summary.SECTION not in markers(readme)


def test_the_readmes_link_to_the_method_sweep_lands_on_a_heading_of_results_md():
    """The answer's link names results.md's heading by GitHub's anchor (lower case, punctuation dropped,
    spaces as hyphens); a renamed heading would leave the README pointing nowhere."""
    anchors = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (RESEARCH / "results.md").read_text().splitlines()
        if line.startswith("#")
    }
    links = re.findall(r"research/results\.md#([\w-]+)", (ROOT / "README.md").read_text())
    assert links and set(links) <= anchors


def test_the_summary_pairs_runs_by_seed_and_calls_a_method_ahead_only_at_p_below_005():
    def run(method: str, seed: int, dice: float) -> dict:
        return {"method": method, "seed": seed, "fraction": 0.1, "metrics": {"test_dice": {"a": {"mean": dice}}}}

    runs = [run("supervised", s, 0.5 + 0.01 * s) for s in range(4)]
    runs += [run("uncol", s, 0.6 + 0.01 * s) for s in (0, 1, 3)]  # seed 2 has no UnCoL run: three pairs
    assert summary.paired(runs, "uncol") == pytest.approx([0.1, 0.1, 0.1])
    same = summary.compare([0.1, 0.1, 0.1])
    assert same["n"] == 3 and same["higher"] == 3 and same["se"] == 0.0
    assert summary.verdict(same) == "n.s."  # no spread: no test, no call
    clear = summary.compare([0.10, 0.11, 0.09, 0.10])
    assert clear["p"] < 0.05 and summary.verdict(clear) == "ahead"
    assert summary.verdict(summary.compare([-0.10, -0.11, -0.09])) == "behind"
    noisy = summary.compare([0.2, -0.1, 0.05])
    assert noisy["p"] >= 0.05 and summary.verdict(noisy) == "n.s." and noisy["higher"] == 2


#: absolute paths of a machine that a committed result must not hold
MACHINE_PATH = re.compile(r"(?<![\w.])/(tmp|work|home|root|Users|mnt|scratch)/")


def test_committed_results_hold_no_dirty_stamps_and_no_machine_paths():
    """A result made from uncommitted code ("-dirty") cannot be traced to its code, and a machine's
    folders say nothing on another: neither is committed."""
    texts = [p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".log", ".md")]
    assert texts
    for path in texts:
        text = path.read_text()
        assert "dirty" not in text, path.relative_to(ROOT)
        assert not MACHINE_PATH.search(text), (path.relative_to(ROOT), MACHINE_PATH.search(text).group(0))
    for page in PAGES:
        assert not MACHINE_PATH.search(page.read_text()), page.name


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: p.name)
def test_every_plus_minus_says_which_spread_it_is_and_every_link_resolves(page):
    text = page.read_text()
    for name in markers(text):
        body = section(text, name)
        if "±" in body:
            assert re.search(r"sample std|population std|standard error", body), f"{name}: '±' of what?"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: link to a missing {target}"
