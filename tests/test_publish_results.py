"""scripts/publish_results.py: a suite's section is replaced, the others kept, each with its provenance."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "publish_results.py"


def _module():
    spec = importlib.util.spec_from_file_location("publish_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_suite_section_is_replaced_and_the_others_kept(tmp_path):
    publish = _module()
    publish.PAGE = tmp_path / "results.md"
    publish.write_page({"quick": publish.section("quick", "board A", 60, "lrpilot bench --suite quick")})
    publish.write_page({"standard": publish.section("standard", "board B", 120, "lrpilot bench --suite standard")})
    publish.write_page({"quick": publish.section("quick", "board C", 90, "lrpilot bench --suite quick")})
    text = publish.PAGE.read_text()
    assert text.startswith(publish.HEADER)
    assert text.count("## Suite `") == 2 and "board A" not in text and "board B" in text and "board C" in text
    quick = text[text.index("## Suite `quick`"):]
    assert "lrpilot commit: `" in quick and "wall time of this invocation: 1.5 min" in quick and "cores" in quick


def test_report_only_sections_say_they_ran_nothing_and_name_the_report_command(tmp_path, monkeypatch):
    publish = _module()
    publish.PAGE = tmp_path / "results.md"
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return type("Done", (), {"stdout": "board D", "returncode": 0})()

    monkeypatch.setattr(publish.subprocess, "run", fake_run)
    report, wall, command = publish.report_store("robustness")
    assert wall == 0.0 and report == "board D" and command == "lrpilot report --all runs/results/robustness"
    assert [c for c in calls if "bench" in c] == [] and any("--all" in c for c in calls)  # nothing was trained
    text = publish.section("robustness", report, wall, command)
    assert "reported from the store" in text and "wall time" not in text and "board D" in text
