"""The benchmark suites' --smoke paths, in-process on a CPU: they run, write what docs/performance.md promises,
and compare equal math (ours against the materializing reference)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside src/, not installed

from benchmarks import attention_layer, gpu_step, host_ops, train_step, unet_step  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_smoke(module, tmp_path) -> dict:
    out = tmp_path / f"{module.SUITE}.json"
    payload = module.main(["--device", "cpu", "--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert out.with_suffix(".md").read_text().count("\n|") >= 3  # header, rule, a row at least
    assert payload["suite"] == module.SUITE
    assert {"torch", "diffusers", "device", "dtype", "preset"} <= payload["environment"].keys()
    return payload


def test_attention_layer_smoke(tmp_path):
    payload = run_smoke(attention_layer, tmp_path)
    assert {"matmul", "results", "checks", "floor"} <= payload.keys()
    rows = {(r["method"], r["n_q"]): r for r in payload["results"]}
    assert set(rows) == {("vanilla", None), ("ip-adapter-16", None), ("ours", 8), ("ours-processor", 8),
                         ("ip-adapter-8", 8), ("naive", 8)}
    for row in rows.values():
        assert {"ms", "time", "peak_bytes", "time_vs_vanilla", "memory_vs_vanilla"} <= row.keys()
        assert row["ms"] > 0 and row["peak_bytes"] > 0
    assert rows[("vanilla", None)]["time_vs_vanilla"] == 1.0
    [check] = payload["checks"]
    assert check["relative_diff"] <= 1e-4  # ours == naive == the processor path, in fp32
    assert check["subject_effect"] > 1e-2  # and the subject really changes the output
    [floor] = payload["floor"]
    assert {"extra_gflops", "extra_floor_ms", "extra_ms", "extra_vs_floor", "naive_memory_over_ours"} <= floor.keys()
    # the reference really holds the (B, H, N, T, d) tensor; ours never does
    shape = attention_layer.SHAPES["smoke"][0]
    materialized = 2 * shape.queries * attention_layer.TEXT_TOKENS * shape.width * 4
    assert rows[("naive", 8)]["peak_bytes"] >= materialized > rows[("ours", 8)]["peak_bytes"]


def test_ours_matches_naive_reference():
    shape = attention_layer.LayerShape("odd", queries=30, width=48, heads=3, text_dim=20)
    check = attention_layer.check_equal_math(shape, n_q=5, device=torch.device("cpu"))
    assert check["relative_diff"] <= 1e-4 and check["negative_row_diff"] <= 1e-5


def test_unet_step_smoke(tmp_path):
    payload = run_smoke(unet_step, tmp_path)
    assert {"unet_config", "resolution", "steps", "results"} <= payload.keys()
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == ["vanilla", "nested-8", "ip-adapter-16"]
    for row in rows.values():
        assert {"step_ms", "step_vs_vanilla", "image_s", "image_vs_vanilla", "peak_bytes", "step_flops",
                "flops_vs_vanilla"} <= row.keys()
    nested = rows["nested-8"]
    assert 1 < nested["flops_vs_vanilla"] < 1.01  # the nested FLOPs are counted, and small
    assert {"kv_ms", "kv_gflops", "kv_cache_mib", "kv_every_step_s"} <= nested.keys()


def test_train_step_smoke(tmp_path):
    payload = run_smoke(train_step, tmp_path)
    assert {"matmul", "results", "num_queries"} <= payload.keys()
    [row] = payload["results"]
    assert {"samples_per_s", "peak_gib", "model_tflops_per_step", "hardware_tflops_per_step", "mfu", "hfu"} <= row.keys()
    assert row["samples_per_s"] > 0 and row["peak_gib"] > row["state_gib"] > 0
    assert row["hardware_tflops_per_step"] > row["model_tflops_per_step"] > 0  # checkpointing recomputes forward


def test_host_ops_smoke_guards_the_op_count(tmp_path):
    """A guided forward of the SDXL-structured UNet (70 cross-attention layers) dispatches at most 5 % more aten
    operations than vanilla with one subject (measured: 1.03x), 25 % with two (1.10x), 40 % at a generation's
    first step (1.25x, 1.33x), and never one that waits for the device."""
    payload = run_smoke(host_ops, tmp_path)
    assert payload["layers"] == 70
    rows = {r["method"]: r for r in payload["forward"]}
    assert all(r["syncs"] == 0 and r.get("first_syncs", 0) == 0 for r in rows.values())
    assert rows["nested-8-x1"]["ops_vs_vanilla"] <= 1.05 and rows["nested-8-x2"]["ops_vs_vanilla"] <= 1.25
    assert max(rows["nested-8-x1"]["first_vs_vanilla"], rows["nested-8-x2"]["first_vs_vanilla"]) <= 1.40
    assert rows["nested-wrapping-8-x1"]["ops_vs_vanilla"] > 1.5  # the count sees the difference between the paths
    layers = {r["method"]: r for r in payload["layer_calls"]}
    assert layers["nested-8-x1"]["layer_ops"] <= layers["nested-8-x1"]["vanilla_layer_ops"] + 3


def test_gpu_step_smoke_on_the_cpu(tmp_path):
    payload = run_smoke(gpu_step, tmp_path)
    steps = {r["method"]: r for r in payload["steps"]}
    assert list(steps) == ["vanilla", "nested-8"]
    assert all(r["eager_ms"] > 0 and r["wall_ms"] > 0 for r in steps.values())
    layers = {(r["layer"], r["method"]) for r in payload["layers"]}
    assert {method for _, method in layers} == {"vanilla", "nested-8", "nested-wrapping-8"}
    assert all(r["sdpa_kernels"] for r in payload["layers"])  # the profiler saw the attention calls
