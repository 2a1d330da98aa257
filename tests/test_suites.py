"""Suites: the shipped files parse, names resolve at run time, what cannot run is skipped and said."""

from __future__ import annotations

import json

import pytest

from lrpilot.bench.suites import RunSpec, Suite, list_suites, load_suite, run_key, task_problem
from lrpilot.core.registry import get_method, list_methods

SHIPPED = {"quick", "standard", "aalr", "mi-decay", "rt-hpo", "lipschitz", "hyperreg"}


def suite(**data) -> Suite:
    return Suite.from_json({"name": "t", **data}, source="test")


def test_every_shipped_suite_parses_and_resolves():
    suites = {s.name: s for s in list_suites()}
    assert SHIPPED <= set(suites)
    for s in suites.values():
        plan = s.resolve()
        assert s.description
        assert len({spec.key for spec in plan.specs}) == len(plan.specs)


def test_quick_and_standard_are_tag_driven():
    quick = load_suite("quick")
    assert [t for b in quick.blocks for t in b["tasks"]] == ["digits-mlp", "mnist1d-mlp"]
    assert [m for b in quick.blocks for m in b["methods"]] == [
        {"tag": "auto"}, {"tag": "seed-method"}, {"tag": "main-baseline"}, {"tag": "peer"}, {"tag": "tuned"}]  # fmt: skip
    plan = quick.resolve()
    assert plan.labels[0] == "auto"  # lrpilot's own autopilot first
    main = [m.name for m in list_methods(tags=["main-baseline"])]
    assert set(main) <= set(plan.labels)
    assert quick.seeds == (0, 1, 2)  # the demo's medians and spreads are over three seeds
    assert {(s.task, s.seed) for s in plan.specs} == {(t, seed) for t in ("digits-mlp", "mnist1d-mlp") for seed in (0, 1, 2)}
    standard = load_suite("standard")
    assert standard.seeds == (0, 1, 2)
    assert [t for b in standard.blocks for t in b["tasks"]] == ["digits-mlp", "mnist1d-mlp", "mnist1d-cnn", "fmnist-mlp",
                                                                  "fmnist-lenet"]  # fmt: skip


@pytest.mark.parametrize("name", ["quick", "standard", "robustness"])
def test_verdict_suites_run_every_peer_and_the_tuned_reference(name):
    """A verdict's "best peer" is only as good as the peers it ran: the robustness suite once ran three of
    seven, and missed the best on ResNet-20 (schedulefree-adamw; docs/methods/auto.md, round 5)."""
    labels = set(load_suite(name).resolve().labels)
    peers = {m.name for m in list_methods(tags=["peer"]) if m.available}
    assert peers <= labels, sorted(peers - labels)
    assert {"auto", "sgd-cosine-tuned"} <= labels


def test_methods_from_other_branches_or_missing_packages_are_skipped_and_said(caplog):
    s = suite(tasks=["iris-softmax", "no-such-task"], methods=["sgd", "aalr-from-another-branch", {"tag": "no-such-tag"},
                                                               {"name": "sgd", "options": {"bogus": 1}}])  # fmt: skip
    plan = s.resolve()
    assert [spec.label for spec in plan.specs] == ["sgd"]
    skipped = {(k.kind, k.name): k.reason for k in plan.skipped}
    assert "not registered on this install" in skipped[("method", "aalr-from-another-branch")]
    assert "no registered method has tag 'no-such-tag'" in skipped[("tag", "no-such-tag")]
    assert "unknown option 'bogus'" in skipped[("method", "sgd[bogus=1]")]
    assert "not registered on this install" in skipped[("task", "no-such-task")]
    assert "skipping method aalr-from-another-branch" in caplog.text


def test_missing_optional_package_is_skipped_with_the_install_command(monkeypatch):
    from dataclasses import replace

    from lrpilot.core.registry import _REGISTRY

    info = replace(get_method("adam"), name="needs-pkg", requires=("no_such_package_xyz",), extra="peers")
    monkeypatch.setitem(_REGISTRY, "needs-pkg", info)
    plan = suite(tasks=["iris-softmax"], methods=["needs-pkg", "sgd"]).resolve()
    assert [s.label for s in plan.specs] == ["sgd"]
    assert "pip install 'lrpilot[peers]'" in plan.skipped[0].reason


def test_missing_fashion_mnist_is_a_skipped_task(tmp_path):
    assert "Fashion-MNIST is not in" in task_problem("fmnist-mlp", str(tmp_path))
    plan = suite(tasks=["fmnist-mlp", "iris-softmax"], methods=["sgd"]).resolve(data_dir=str(tmp_path))
    assert [s.task for s in plan.specs] == ["iris-softmax"]
    assert plan.skipped[0].kind == "task"


def test_labels_options_grids_and_task_overrides():
    s = suite(
        seeds=[0, 1],
        tasks=[{"name": "iris-softmax", "epochs": 7, "batch_size": 8}],
        methods=[{"name": "sgd", "options": {"momentum": 0.0}, "label": "gd", "grid": {"lr": [0.01, 1.0]}},
                 {"name": "adam", "grid": {"lr": [0.001]}}, {"name": "sgd", "options": {"lr": 0.05}}],
    )  # fmt: skip
    plan = s.resolve()
    assert plan.labels == ["gd[lr=0.01]", "gd[lr=1]", "adam[lr=0.001]", "sgd[lr=0.05]"]
    spec = plan.specs[0]
    assert (spec.epochs, spec.batch_size, spec.seed) == (7, 8, 0)
    assert spec.method_options == {"momentum": 0.0, "lr": 0.01}
    assert spec.options == {**get_method("sgd").defaults, "momentum": 0.0, "lr": 0.01}
    assert len(plan.specs) == 8  # 4 methods x 2 seeds


def test_family_selector_and_exclude():
    plan = suite(tasks=["iris-softmax"], methods=[{"family": "baseline", "exclude": ["lars", "sgd"]}]).resolve()
    expected = [m.name for m in list_methods() if m.family == "baseline" and m.name not in ("lars", "sgd")]
    assert plan.labels == expected


def test_blocks_give_different_methods_to_different_tasks():
    s = Suite.from_json({"name": "b", "seeds": [3], "blocks": [
        {"tasks": ["iris-softmax"], "methods": ["sgd"]},
        {"tasks": ["digits-softmax"], "methods": ["adam"], "seeds": [1, 2]}]})  # fmt: skip
    plan = s.resolve()
    assert sorted((x.task, x.label, x.seed) for x in plan.specs) == [
        ("digits-softmax", "adam", 1), ("digits-softmax", "adam", 2), ("iris-softmax", "sgd", 3)]  # fmt: skip


def test_filters_are_subsets_of_the_suite():
    s = suite(seeds=[0, 1, 2], tasks=["iris-softmax", "digits-softmax"], methods=["sgd", "adam"])
    plan = s.resolve(methods=["adam"], tasks=["digits-softmax"], seeds=[5])
    assert [(x.task, x.label, x.seed) for x in plan.specs] == [("digits-softmax", "adam", 5)]
    with pytest.raises(ValueError, match=r"method 'onecycle' not in suite 't'; its methods on this install: .*sgd"):
        s.resolve(methods=["onecycle"])
    with pytest.raises(ValueError, match="task 'mnist1d-mlp' not in suite"):
        s.resolve(tasks=["mnist1d-mlp"])


def test_same_run_named_twice_is_planned_once():
    plan = suite(tasks=["iris-softmax"], methods=["sgd", {"tag": "main-baseline"}, {"name": "sgd", "options": {}}]).resolve()
    assert [x.label for x in plan.specs].count("sgd") == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"tasks": ["iris-softmax"], "methods": ["sgd"], "seed": [0]}, r"unknown key 'seed'; valid keys: .*seeds"),
        ({"tasks": ["iris-softmax"], "methods": [{"tag": "x", "name": "y"}]}, "exactly one of name, tag, family"),
        ({"tasks": ["iris-softmax"], "methods": [{"tag": "x", "label": "y"}]}, "'label' only applies"),
        ({"tasks": [], "methods": ["sgd"]}, "non-empty 'tasks'"),
        ({"tasks": ["iris-softmax"], "methods": ["sgd"], "seeds": [-1]}, "non-negative integers"),
        ({"tasks": ["iris-softmax"], "methods": ["sgd"], "format": 2}, "format 2 is not supported"),
        ({"tasks": [{"name": "iris-softmax", "epoch": 3}], "methods": ["sgd"]}, "unknown key 'epoch'"),
    ],
)
def test_bad_suites_raise_a_message_naming_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        suite(**data)


def test_two_runs_with_one_label_is_an_error():
    s = suite(tasks=["iris-softmax"], methods=[{"name": "sgd", "label": "x"}, {"name": "adam", "label": "x"}])
    with pytest.raises(ValueError, match="label 'x' names two different runs"):
        s.resolve()


def test_load_suite_by_name_or_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"tasks": ["iris-softmax"], "methods": ["sgd"]}))
    assert load_suite(path).name == "mine"
    with pytest.raises(ValueError, match="unknown suite 'nope'; shipped suites: .*quick"):
        load_suite("nope")
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_suite(tmp_path / "bad.json")


def test_run_key_depends_on_what_determines_the_result_only():
    base = RunSpec("iris-softmax", "sgd", 0, 10, 16, {"lr": 0.1}, lrpilot_version="1.0")
    same = RunSpec("iris-softmax", "sgd", 0, 10, 16, {"lr": 0.1}, label="other-label", data_dir="/x", lrpilot_version="1.0")
    assert base.key == same.key
    for changed in (RunSpec("iris-softmax", "sgd", 1, 10, 16, {"lr": 0.1}, lrpilot_version="1.0"),
                    RunSpec("iris-softmax", "sgd", 0, 11, 16, {"lr": 0.1}, lrpilot_version="1.0"),
                    RunSpec("iris-softmax", "sgd", 0, 10, 16, {"lr": 0.2}, lrpilot_version="1.0"),
                    RunSpec("iris-softmax", "adam", 0, 10, 16, {"lr": 0.1}, lrpilot_version="1.0"),
                    RunSpec("iris-softmax", "sgd", 0, 10, 16, {"lr": 0.1}, lrpilot_version="1.1")):  # fmt: skip
        assert changed.key != base.key
    # Tuples and lists are the same option value; key order does not matter.
    assert run_key("t", "m", {"a": (1, 2), "b": 1}, 0, "v") == run_key("t", "m", {"b": 1, "a": [1, 2]}, 0, "v")


def test_specs_round_trip_through_plain_dicts():
    spec = load_suite("quick").resolve().specs[0]
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.key == spec.key and again.label == spec.label and again.tags == spec.tags


def test_cli_lists_suites(capsys):
    from lrpilot.cli import main

    assert main(["list", "suites"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{s.name}\t{s.description}" for s in list_suites()]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "nope"], "method 'nope' not in suite 'quick'"),
        (["--tasks", "iris-softmax"], "task 'iris-softmax' not in suite 'quick'"),
        (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
        (["--suite-typo"], None),
    ],
)
def test_cli_bench_rejects_bad_subsets_in_one_line(argv, message, tmp_path, capsys):
    from lrpilot.cli import main

    if message is None:
        with pytest.raises(SystemExit):
            main(["bench", "--suite", "quick", "--out", str(tmp_path), *argv])
        return
    assert main(["bench", "--suite", "quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpilot: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "bench.sqlite").exists()  # nothing written for a command that cannot run


def test_demo_is_the_quick_bench(tmp_path, monkeypatch, capsys):
    from lrpilot.bench import runner
    from lrpilot.bench.leaderboard import build_leaderboard
    from lrpilot.cli import main

    calls = []

    def fake_bench(suite, out, **kwargs):
        calls.append((suite, out, kwargs))
        result = runner.BenchResult(out=tmp_path, planned=0, reused=0, executor="fake")
        return runner.SuiteRun(result, build_leaderboard([], {}), tmp_path / "report.html")

    monkeypatch.setattr(runner, "bench", fake_bench)
    assert main(["demo", "--out", str(tmp_path), "--workers", "1"]) == 0
    (suite, out, kwargs), = calls
    assert (suite, out, kwargs["workers"], kwargs["methods"], kwargs["seeds"]) == ("quick", str(tmp_path), 1, None, None)
    assert kwargs["argv"] == ["lrpilot", "demo", "--out", str(tmp_path), "--workers", "1"]  # recorded in the store
    assert f"report:  {tmp_path / 'report.html'}" in capsys.readouterr().out


def test_cli_bench_isolate_reaches_the_executor(tmp_path, monkeypatch, capsys):
    from lrpilot.bench import runner
    from lrpilot.bench.leaderboard import build_leaderboard
    from lrpilot.cli import main

    calls = []

    def fake_bench(suite, out, **kwargs):
        calls.append(kwargs)
        return runner.SuiteRun(runner.BenchResult(out=tmp_path, planned=0, reused=0, executor="fake"),
                               build_leaderboard([], {}), None)  # fmt: skip

    monkeypatch.setattr(runner, "bench", fake_bench)
    assert main(["bench", "--suite", "quick", "--out", str(tmp_path), "--isolate"]) == 0
    assert main(["bench", "--suite", "quick", "--out", str(tmp_path)]) == 0
    assert [c["isolate"] for c in calls] == [True, False]  # reuse is the default
