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
