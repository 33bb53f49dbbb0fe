"""bench.throughput: a tiny end-to-end run on the CPU (JSON fields, the report's markdown beside
it, skips recorded), and the pure parts (kernel classification, planning, CLI errors)."""

import json

import pytest

from bench import throughput
from bench.report.document import Context
from bench.report.sections import throughput as report_section
from bench.report.sections.throughput_analysis import analyse
from bench.throughput_cases import MODELS, build_case, kernel_family, kernel_kind, \
    kernel_time_split

def markdown_section(results):
    """The report's throughput section for a results folder (no figures)."""
    return report_section.section(Context(results))


# A model small enough for a CPU test; same block as the paper's.
TOY = dict(kind="model", preset="sqa-dense", d_model=64, n_layers=1, d_ff=64, vocab_size=64)
TINY_ARGS = ["--models", "toy,attn16", "--seqs", "32", "--batches", "32:2",
             "--variants", "mha,sqa,gqa", "--families", "sdpa", "--op-families", "sdpa",
             "--repeats", "1", "--peak-size", "64", "--no-plot"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", TOY)


def test_tiny_run_writes_json_and_markdown(toy, tmp_path):
    result = throughput.main(TINY_ARGS + ["--out", str(tmp_path)])
    files = list(tmp_path.glob("throughput_*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    saved = json.loads(files[0].read_text())
    assert saved["complete"] and saved["matmul_peak_tflops"]["start"] > 0
    cases = saved["cases"]
    # toy: 3 variants x 2 modes; attn16: 3 variants, forward only.
    assert len(cases) == 9 and {c["status"] for c in cases} == {"ok"}
    for c in cases:
        assert c["timing"]["n"] >= 1 and c["seconds"] > 0 and c["step_flops"] > 0
    assert {c["mode"] for c in cases if c["model"] == "toy"} == {"forward", "train"}
    sqa = next(c for c in cases if c["model"] == "toy" and c["variant"] == "sqa"
               and c["mode"] == "forward")
    assert (sqa["n_q_heads"], sqa["n_kv_heads"]) == (8, 4)
    # Profiled once per series, with a family that names the SDPA path.
    assert all(c["kernel_family"].startswith("sdpa-") for c in cases)
    # The JSON holds measurements; what they mean is the report's reading of them.
    assert "criteria" not in saved and "matched" not in saved
    found = analyse(saved)
    sqa = next(c for c in found["cases"] if c["model"] == "toy" and c["variant"] == "sqa"
               and c["mode"] == "forward")
    assert sqa["vs_mha"] > 0 and sqa["vs_gqa"] > 0
    assert any(r["variant"] == "sqa" and r["baseline"] == "gqa" and r["head_ratio"] == 2.0
               for r in found["matched"])
    assert {k["status"] for k in found["criteria"]} <= {"PASS", "MISS", "INFO", "N/A"}
    assert "## Long-sequence throughput" in files[0].with_suffix(".md").read_text()
    md = markdown_section(tmp_path)
    assert "Long-sequence throughput" in md and "| MHA |" in md and "Criteria" in md
    assert result["cases"][0]["order"] == 0


def test_budget_cut_is_recorded_never_silent(toy, tmp_path):
    result = throughput.main(TINY_ARGS + ["--out", str(tmp_path), "--budget-seconds", "0",
                                          "--modes", "forward"])
    assert result["cases"] and all(c["status"] == "skipped" and "budget" in c["reason"]
                                   for c in result["cases"])
    assert "skipped" in markdown_section(tmp_path)


def test_checkpointed_training_mode_recomputes_blocks(toy, tmp_path):
    args = TINY_ARGS[:]
    args[args.index("toy,attn16")] = "toy"
    result = throughput.main(args + ["--out", str(tmp_path), "--modes", "train,train-ckpt"])
    cases = {c["mode"]: c for c in result["cases"] if c["variant"] == "mha"}
    assert cases["train-ckpt"]["status"] == "ok" and cases["train-ckpt"]["checkpoint_blocks"]
    assert not cases["train"]["checkpoint_blocks"]
    # Credited the same useful FLOPs: the recompute is overhead, so it shows as lower TFLOP/s.
    assert cases["train-ckpt"]["step_flops"] == cases["train"]["step_flops"]
    assert "train-ckpt" in markdown_section(tmp_path)


def test_unknown_variant_lists_accepted():
    with pytest.raises(ValueError, match="xsqa"):
        throughput.parse_args(["--variants", "mha,nope"])
    with pytest.raises(ValueError, match="attn128"):
        throughput.parse_args(["--models", "bogus"])


def test_plan_windows_only_on_flex_and_forward_first():
    a = throughput.parse_args(["--models", "paper", "--seqs", "1024,4096",
                               "--variants", "mha,mha@128", "--flex-variants", "all",
                               "--flex-train-variants", "all"])
    cases = throughput.plan(a)
    assert all(c["family"] == "flex" for c in cases if "@" in c["variant"])
    modes = [c["mode"] for c in cases]
    assert modes == sorted(modes, key=lambda m: m != "forward")
    assert [c["order"] for c in cases] == list(range(len(cases)))
    # 2 variants on flex + 1 on sdpa, 2 lengths, 2 modes.
    assert len(cases) == 12


@pytest.mark.parametrize("names, family", [
    (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<16>>"], "sdpa-flash"),
    (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16"], "sdpa-cudnn"),
    (["fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)"],
     "sdpa-efficient"),
    (["triton_tem_fused_0", "triton_tem_fused_zeros_1"], "flex"),
    (["cunn_SoftMaxForward", "void pytorch_flash::flash_bwd_dot_do_o_kernel"], "sdpa-flash"),
    (["softmax_warp_forward", "ampere_bf16_s16816gemm"], "sdpa-math"),
    (["triton_tem_fused_0", "void pytorch_flash::flash_fwd_kernel"], "mixed:flex+sdpa-flash"),
    ([], "unknown"),
])
def test_kernel_family(names, family):
    assert kernel_family(names) == family


def test_inductors_fused_kernels_are_never_attention_even_when_named_after_it():
    name = ("triton_poi_fused__to_copy__unsafe_view_add_arange_cat_copy_cos_flash_attn_fwd_mul_"
            "sin_slice_split")
    assert kernel_kind(name) is None
    assert kernel_family([name, "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90"]) == "flash"


def test_kernel_kind_ignores_other_kernels():
    assert kernel_kind("ampere_bf16_s16816gemm_bf16_128x128") is None


def test_attention_kernel_names_keep_every_backends_attention_and_nothing_else():
    from bench.common import attention_kernel_names
    attention = ["void pytorch_flash::flash_fwd_kernel", "cudnn_generated_fort_native_sdpa",
                 "fmha_cutlassF_bf16_aligned", "triton_tem_fused_0", "softmax_warp_forward",
                 "aten::_scaled_dot_product_flash_attention_for_cpu"]
    other = ["ampere_bf16_s16816gemm_bf16_128x128", "aten::addmm", "vectorized_elementwise"]
    assert attention_kernel_names(attention + other + attention) == sorted(attention)


def test_op_training_and_one_seed_per_cell(toy, tmp_path):
    """The op runs forward and backward; every mode of a cell starts from the same weights and
    batch, so the plain and the checkpointed step report the same first-step loss."""
    args = TINY_ARGS[:]
    args[args.index("mha,sqa,gqa")] = "mha,sqa"
    result = throughput.main(args + ["--out", str(tmp_path), "--modes", "train,train-ckpt",
                                     "--op-modes", "forward,train"])
    cases = result["cases"]
    op = {(c["mode"], c["variant"]): c for c in cases if c["model"] == "attn16"}
    assert {c["status"] for c in op.values()} == {"ok"} and len(op) == 4
    # FlashAttention's count: the backward is 2.5 forwards.
    assert op[("train", "mha")]["step_flops"] == 3.5 * op[("forward", "mha")]["step_flops"]
    for v in ("mha", "sqa"):
        plain, ckpt = (next(c for c in cases if c["model"] == "toy" and c["variant"] == v
                            and c["mode"] == m) for m in ("train", "train-ckpt"))
        assert plain["first_step_loss"] == pytest.approx(ckpt["first_step_loss"], rel=1e-6)
        assert plain["first_step_grad_norm"] > 0
    assert "attn16 · train · sdpa" in markdown_section(tmp_path)


def test_flash_where_it_cannot_run_is_a_recorded_error(toy, tmp_path):
    result = throughput.main(TINY_ARGS + ["--out", str(tmp_path), "--families", "flash",
                                          "--op-families", "flash", "--modes", "forward"])
    assert result["cases"] and all(c["status"] == "error" and "backend='flash'" in c["reason"]
                                   for c in result["cases"])


def test_plan_runs_windows_on_flash_and_no_flash_backward_at_head_dim_16():
    a = throughput.parse_args(["--models", "paper,wide64,attn16,attn128", "--seqs", "1024",
                               "--variants", "mha,mha@128", "--families", "sdpa,flash",
                               "--op-families", "sdpa-cudnn,flash", "--op-modes",
                               "forward,train", "--flash-variants", "all",
                               "--op-flash-variants", "all"])
    cells = {(c["model"], c["mode"], c["family"], c["variant"]) for c in throughput.plan(a)}
    assert ("wide64", "train", "flash", "mha@128") in cells
    assert ("attn128", "train", "flash", "mha@128") in cells
    assert not any(f == "sdpa" and "@" in v for _, _, f, v in cells)
    # head dim 16 (the paper model, attn16): flash forward only.
    assert ("paper", "forward", "flash", "mha") in cells and ("attn16", "forward", "flash",
                                                               "mha") in cells
    assert not any(m in ("paper", "attn16") and f == "flash" and mode != "forward"
                   for m, mode, f, _ in cells)


def test_flash_kernels_are_their_own_family():
    fa4 = ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at"
           "__tensor0000o11101213")
    assert kernel_kind(fa4) == "flash"
    assert kernel_family([fa4, "kernel_cutlass_kernel_flash_attncuteflash_bwd_preprocess"]) \
        == "flash"


def test_compiled_modes_compile_the_step_and_keep_the_checkpoint_choice(toy):
    import torch
    for mode, ckpt in (("train-compiled", False), ("train-ckpt-compiled", True)):
        case = build_case("toy", mode, "sdpa", "mha", 32, 2, torch.device("cpu"), "none", 0)
        assert case.info["compiled"] and case.info["checkpoint_blocks"] == ckpt
    eager = build_case("toy", "train", "sdpa", "mha", 32, 2, torch.device("cpu"), "none", 0)
    assert not eager.info["compiled"]
    assert {c["mode"] for c in throughput.plan(throughput.parse_args(
        TINY_ARGS + ["--modes", "train-compiled"]))} >= {"train-compiled"}


def test_kernel_time_split_counts_every_backends_attention_kernels_and_only_those():
    split = kernel_time_split([
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 300.0),
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>", 20.0),
        ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90", 500.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 900.0),
        ("void at::native::cunn_SoftMaxForwardSmem<8, c10::BFloat16>", 280.0)])
    assert split == {"kernel_ms": 2.0, "attention_kernel_ms": 0.82}
