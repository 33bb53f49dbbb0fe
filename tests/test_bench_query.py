"""bench.query end to end on the CPU (--tiny): every experiment writes its runs and a summary that
pairs its numbers by seed, and the report renders it, or says there are no runs yet."""

import json

import pytest

from bench import query
from bench.report import document
from bench.report.run_file import render_run
from bench.report.sections import query as query_section


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two commands on one run folder: the conversions, then the controls beside the same
    bases (--into), as work that does not fit one command is split."""
    out = tmp_path_factory.mktemp("results")
    assert query.main(["--tiny", "--no-report", "--experiments", "static", "uptrain",
                       "--out", str(out)]) == 0
    (summary,) = out.glob("query/*-tiny/summary.json")
    base = summary.parent / "runs" / "base-mha-s0.json"
    trained = base.read_text()
    assert query.main(["--tiny", "--no-report", "--experiments", "controls",
                       "--into", str(summary.parent)]) == 0
    assert base.read_text() == trained          # the base was reused, not trained again
    return out, summary, json.loads(summary.read_text())


def test_every_experiment_is_in_the_summary(tiny_run):
    _, path, s = tiny_run
    assert s["kind"] == "query" and s["experiments"] == ["static", "uptrain", "controls"]
    assert len(s["commands"]) == 2 and "--into" in s["commands"][1]
    roles = sorted(r["role"] for r in s["runs"])
    assert roles == ["base", "control", "control", "scratch"]
    assert len(list((path.parent / "runs").glob("*.json"))) == 4
    # Static: k = 1 .. n_layers, and k = n_layers is every layer whichever end it starts from.
    rows = s["static"]["rows"]
    # The probe's shares per layer, before and after RoPE, each in [0, 1].
    for layer in s["static"]["layers"]:
        for key in ("q_share", "q_share_rotated", "k_share"):
            assert layer[key]["n"] == 1 and 0.0 <= layer[key]["mean"] <= 1.0
    assert [r["k"] for r in rows] == [1, 2] and rows[-1]["most"]["layers"] == [[0, 1]]
    assert rows[-1]["least_minus_most_after"]["mean"] == 0.0
    # Uptrain: one row per (target, method), each fraction paired with its scratch run.
    assert [(r["target"], r["method"]) for r in s["uptrain"]["rows"]] == [
        ("xsqa", "first"), ("xsqa", "content"), ("xsqa", "pooled")]
    cell = s["uptrain"]["rows"][0]["fractions"][0]
    assert cell["steps"] == 2 and cell["delta_vs_scratch"]["n"] == 1
    assert s["uptrain"]["scratch"][0]["steps"] == 6
    # Controls beside MHA, which trains a query projection the controls do not have.
    params = {r["variant"]: r["params"] for r in s["controls"]}
    assert params["mha"] - params["idq"] == params["mha"] - params["rndq"] == 2 * 128 * 129


def test_the_report_renders_the_run_and_draws_its_figures(tiny_run):
    _, path, _ = tiny_run
    text, _ = render_run(path)
    for heading in ("probe predict", "match training from scratch", "Controls"):
        assert heading in text
    pytest.importorskip("matplotlib")
    assert (path.parent / f"query-static-{path.parent.name}.png").stat().st_size > 0
    assert (path.parent / f"query-uptrain-{path.parent.name}.png").stat().st_size > 0


def test_the_document_takes_the_newest_run_of_each_preset(tiny_run, tmp_path):
    results, path, _ = tiny_run
    text = query_section.section(document.Context(results))
    assert f"`{path}`" in text and "No runs yet" not in text
    empty = query_section.section(document.Context(tmp_path))
    assert "No runs yet" in empty and "python -m bench.query" in empty


def test_newest_per_preset_and_question(tmp_path):
    def uptrain(target):
        return {"experiments": ["uptrain"], "uptrain": {"rows": [{"target": target}]}}
    for name, summary in (("20260101-000000-medium", {"preset": "medium"}),
                          ("20260102-000000-medium-again", {"preset": "medium"}),
                          ("20260101-000000-sqa-dense", {"preset": "sqa-dense"}),
                          ("20260102-000000-sqa-dense", {"preset": "sqa-dense", **uptrain("sqa")}),
                          ("20260103-000000-sqa-dense", {"preset": "sqa-dense",
                                                         **uptrain("xsqa")}),
                          ("20260104-000000-sqa-dense", {"preset": "sqa-dense",
                                                         **uptrain("xsqa")})):
        (tmp_path / "query" / name).mkdir(parents=True)
        (tmp_path / "query" / name / "summary.json").write_text(json.dumps(summary))
    # A rerun of the same question replaces the earlier one; another question is shown beside it.
    assert [p.parent.name for _, p in query_section.newest_per_preset(tmp_path)] == [
        "20260102-000000-medium-again", "20260101-000000-sqa-dense",
        "20260102-000000-sqa-dense", "20260104-000000-sqa-dense"]


def test_bad_settings_are_one_line_and_status_2(tiny_run, capsys):
    assert query.main(["--tiny", "--fractions", "1.5"]) == 2
    assert "fraction 1.5" in capsys.readouterr().err
    assert query.main(["--tiny", "--targets", "nope"]) == 2
    assert query.main(["--tiny", "--size", "small", "--into", str(tiny_run[1].parent)]) == 2
    assert "holds preset 'tiny', not 'small'" in capsys.readouterr().err
