"""A tiny CPU run of the decode benchmark: the JSON has every part, and the report renders it
(printed after the run, and as docs/results.md's section). Speeds on the CPU mean nothing; only
the plumbing is tested."""

import importlib.util
import json

import bench.decode as decode
from bench.report.document import Context
from bench.report.sections import decode as report_section


def test_decode_benchmark_smoke(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--sizes", "tiny", "--variants",
            "mha,sqt", "--batches", "1", "--contexts", "32", "--new-tokens", "3",
            "--eager-tokens", "3", "--repeats", "2", "--eager-repeats", "1", "--rounds", "2",
            "--eager-rounds", "1", "--profile-sizes", "tiny", "--case-seconds", "1"]
    assert decode.main(argv) == 0
    printed = capsys.readouterr().out     # the report's section, run as its own process
    assert "### Criteria" in printed and "- SQT vs MHA, tiny, batch 1, engine" in printed
    (path,) = tmp_path.glob("decode_*.json")
    res = json.loads(path.read_text())
    rows = {r["variant"]: r for r in res["cases"]}
    assert set(rows) == {"mha", "sqt"}
    for r in rows.values():
        assert r["status"] == "ok" and r["context"] == 32 and r["new_tokens"] == 3
        assert r["engine"]["median_ms"] > 0 and r["eager"]["total_n_ms"]["n"] >= 1
        assert r["kv_bytes_per_token"] == 2 * 2 * 128 * 4   # 2 layers, K and V, d_model, fp32
        assert r["kernels"]["per_step"] > 0 and "prefill" in r
    (pair,) = res["sqt_vs_baseline"]
    assert pair["engine"]["rounds"] == 2 and pair["eager"]["rounds"] == 1
    if importlib.util.find_spec("transformers") is None:
        assert res["hf_status"] == "not installed"
    else:
        assert res["hf"] and res["hf"][0]["hf"]["median_ms"] == res["hf"][0]["hf"]["median_ms"]
    md = report_section.section(Context(tmp_path))
    assert md.startswith("## Decode") and "| tiny | sqt | 1 | 32 |" in md
    assert report_section.section(Context(tmp_path / "empty")) is None
