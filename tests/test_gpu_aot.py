"""benchmarks/gpu_aot.py reads kernels off a compiled module's text: checked on a small
hand-written module (the shape of XLA:GPU's output) whose kernels, bytes and bound are counted
by hand below. The compile itself needs a JAX with the CUDA plugin and is not run here."""

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_aot.py")
_SPEC = importlib.util.spec_from_file_location("gpu_aot", _PATH)
gpu_aot = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_aot"] = gpu_aot  # its dataclasses look their module up
_SPEC.loader.exec_module(gpu_aot)

# A decode loop (trip count 4) whose body runs: a gemm fusion (bf16[8,64] x bf16[64,32] ->
# f32[8,32]), an in-place cache update (a dynamic-update-slice of bf16[1,32] into a
# bf16[16,32] buffer), a fusion reading a 4-row slice of a f32[100,32] table, a copy, a
# conditional with two branches (one kernel each, or a kernel and a wider one), and a nested
# loop (trip count 3) of one fusion plus its condition's compare; tuples, bitcasts,
# parameters and constants launch nothing.
MODULE = """HloModule jit_decode, entry_computation_layout={()}

%gemm_fusion_dot.1_computation (parameter_0: bf16[8,64], parameter_1: bf16[64,32]) -> f32[8,32] {
  %parameter_0 = bf16[8,64]{1,0} parameter(0)
  %parameter_1 = bf16[64,32]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (param_0: bf16[16,32], param_1: bf16[1,32], param_2: s32[]) -> bf16[16,32] {
  %param_0 = bf16[16,32]{1,0} parameter(0)
  %param_1 = bf16[1,32]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = bf16[16,32]{1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %zero)
}

%fused_slice_add (param_0.1: f32[100,32], param_1.1: f32[4,32]) -> f32[4,32] {
  %param_0.1 = f32[100,32]{1,0} parameter(0)
  %param_1.1 = f32[4,32]{1,0} parameter(1)
  %bc = f32[100,32]{1,0} bitcast(%param_0.1)
  %slice.1 = f32[4,32]{1,0} slice(%bc), slice={[0:4], [0:32]}
  ROOT %add.1 = f32[4,32]{1,0} add(%slice.1, %param_1.1)
}

%fused_neg (param_0.2: f32[4,32]) -> f32[4,32] {
  %param_0.2 = f32[4,32]{1,0} parameter(0)
  ROOT %neg.1 = f32[4,32]{1,0} negate(%param_0.2)
}

%branch_a (p.a: f32[4,32]) -> f32[4,32] {
  %p.a = f32[4,32]{1,0} parameter(0)
  ROOT %loop_negate_fusion = f32[4,32]{1,0} fusion(%p.a), kind=kLoop, calls=%fused_neg
}

%branch_b (p.b: f32[4,32]) -> f32[4,32] {
  %p.b = f32[4,32]{1,0} parameter(0)
  %copy.9 = f32[4,32]{1,0} copy(%p.b)
  ROOT %copy.10 = f32[4,32]{1,0} copy(%copy.9)
}

%inner_body (p.i: (s32[], f32[4,32])) -> (s32[], f32[4,32]) {
  %p.i = (s32[], f32[4,32]{1,0}) parameter(0)
  %gte.i = f32[4,32]{1,0} get-tuple-element(%p.i), index=1
  %n.i = s32[] get-tuple-element(%p.i), index=0
  %loop_negate_fusion.2 = f32[4,32]{1,0} fusion(%gte.i), kind=kLoop, calls=%fused_neg
  ROOT %t.i = (s32[], f32[4,32]{1,0}) tuple(%n.i, %loop_negate_fusion.2)
}

%inner_cond (p.c: (s32[], f32[4,32])) -> pred[] {
  %p.c = (s32[], f32[4,32]{1,0}) parameter(0)
  %n.c = s32[] get-tuple-element(%p.c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%n.c, %three), direction=LT
}

%body (p: STATE_TYPE) -> (s32[], bf16[16,32]) {
  %p = STATE parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%p), index=2
  %cache = bf16[16,32]{1,0} get-tuple-element(%p), index=3
  %table = f32[100,32]{1,0} get-tuple-element(%p), index=4
  %y = f32[4,32]{1,0} get-tuple-element(%p), index=5
  %gemm_fusion_dot.1 = f32[8,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%GEMM, metadata={op_name="dot"}
  %new = bf16[1,32]{1,0} bitcast(%x)
  %input_dus_fusion = bf16[16,32]{1,0} fusion(%cache, %new, %i), kind=kInput, calls=%fused_dus
  %loop_add_fusion.3 = f32[4,32]{1,0} fusion(%table, %y), kind=kLoop, calls=%fused_slice_add
  %copy.1 = f32[4,32]{1,0} copy(%loop_add_fusion.3)
  %conditional.1 = f32[4,32]{1,0} conditional(%i, %copy.1, %copy.1), BRANCHES
  %start = (s32[], f32[4,32]{1,0}) tuple(%i, %conditional.1)
  %while.2 = (s32[], f32[4,32]{1,0}) while(%start), condition=%inner_cond, body=%inner_body, backend_config=TRIPS3
  ROOT %out = (s32[], bf16[16,32]{1,0}) tuple(%i, %input_dus_fusion)
}

%cond (p.o: STATE_TYPE) -> pred[] {
  %p.o = STATE parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %four = s32[] constant(4)
  ROOT %lt.o = pred[] compare(%n.o, %four), direction=LT
}

ENTRY %main (a: STATE_TYPE) -> (s32[], bf16[16,32]) {
  %a = STATE parameter(0)
  ROOT %while.1 = (s32[], bf16[16,32]{1,0}) while(%a), condition=%cond, body=%body, backend_config=TRIPS4
}
"""
MODULE = (
    MODULE.replace(
        "STATE_TYPE", "(s32[], bf16[8,64], bf16[64,32], bf16[16,32], f32[100,32], f32[4,32])"
    )
    .replace(
        "STATE",
        "(s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}, bf16[16,32]{1,0}, f32[100,32]{1,0}, f32[4,32]{1,0})",
    )
    .replace("%GEMM", "%gemm_fusion_dot.1_computation")
    .replace("BRANCHES", "branch_computations={%branch_a, %branch_b}")
    .replace("TRIPS3", '{"known_trip_count":{"n":"3"}}')
    .replace("TRIPS4", '{"known_trip_count":{"n":"4"}}')
)


def test_shape_bytes_of_arrays_and_tuples():
    assert gpu_aot.shape_bytes("bf16[256,896]{1,0}") == 256 * 896 * 2
    assert gpu_aot.shape_bytes("(s32[], f32[4,32]{1,0}, pred[7])") == 4 + 4 * 32 * 4 + 7
    assert gpu_aot.shape_bytes("f32[]") == 4


def test_loop_kernels_counts_what_one_iteration_launches():
    kernels, info = gpu_aot.loop_kernels(MODULE)
    assert info["body"] == "body" and info["trip_count"] == 4 and info["nested_loops"] == [3]
    by_name = {k.name: k for k in kernels}
    # gemm, cache update, sliced add, copy, the branch moving more bytes (branch_b: two copies
    # of 512 bytes, against branch_a's one fusion), the inner fusion (x3) and the inner
    # condition's compare (x3): 4 + 2 + 3 + 3 = 12 launches
    assert sorted(by_name) == sorted(
        [
            "gemm_fusion_dot.1",
            "input_dus_fusion",
            "loop_add_fusion.3",
            "copy.1",
            "copy.9",
            "copy.10",
            "loop_negate_fusion.2",
            "lt",
        ]
    )
    assert by_name["loop_negate_fusion.2"].times == 3 and by_name["lt"].times == 3
    summary = gpu_aot.summarize(kernels, hbm_bytes_s=1e12, floor_us=2.0, peak_flops=989e12)
    assert summary["kernels"] == 12
    assert summary["by_kind"]["gemm"] == 1 and summary["copies"] == 3


def test_kernel_traffic_counts_slices_and_in_place_updates():
    kernels, _ = gpu_aot.loop_kernels(MODULE)
    k = {k.name: k for k in kernels}
    # the gemm reads both operands whole and writes f32[8,32]; 2 * 8 * 32 * 64 FLOPs
    assert (k["gemm_fusion_dot.1"].bytes_read, k["gemm_fusion_dot.1"].bytes_written) == (
        8 * 64 * 2 + 64 * 32 * 2,
        8 * 32 * 4,
    )
    assert k["gemm_fusion_dot.1"].flops == 2 * 8 * 32 * 64
    # the cache update reads the new row and the index, writes the row: not the 16-row buffer
    assert (k["input_dus_fusion"].bytes_read, k["input_dus_fusion"].bytes_written) == (
        1 * 32 * 2 + 4,
        1 * 32 * 2,
    )
    # the sliced add reads 4 of the table's 100 rows (through a bitcast) and y
    assert k["loop_add_fusion.3"].bytes_read == 4 * 32 * 4 + 4 * 32 * 4
    assert k["loop_add_fusion.3"].bytes_written == 4 * 32 * 4
    assert (k["copy.1"].bytes_read, k["copy.1"].bytes_written) == (512, 512)


def test_bound_is_each_kernel_at_bandwidth_or_floor():
    kernels, _ = gpu_aot.loop_kernels(MODULE)
    # at 1 GB/s every kernel here takes bytes / 1e9 s; at the floor of 2 us, max of the two
    slow = gpu_aot.summarize(kernels, hbm_bytes_s=1e9, floor_us=0.0, peak_flops=989e12)
    total_bytes = sum(k.times * k.bytes for k in kernels)
    assert slow["bytes"] == total_bytes
    assert slow["bound_ms"] == pytest.approx(1000 * total_bytes / 1e9, abs=1e-4)  # 4 decimals
    fast = gpu_aot.summarize(kernels, hbm_bytes_s=1e15, floor_us=2.0, peak_flops=989e12)
    assert fast["bound_ms"] == pytest.approx(12 * 2e-3)
    assert fast["kernels_at_floor"] == 12
    # at 1 MFLOP/s the gemm's 2 * 8 * 32 * 64 FLOPs (32.768 ms) outweigh everything else
    slow_dots = gpu_aot.summarize(kernels, hbm_bytes_s=1e15, floor_us=0.0, peak_flops=1e6)
    assert slow_dots["bound_ms"] == pytest.approx(32.768, abs=1e-3)


def test_no_loop_is_a_clear_error():
    with pytest.raises(ValueError, match="no while loop"):
        gpu_aot.loop_kernels(
            "HloModule m\n\nENTRY %main (a: f32[]) -> f32[] {\n  ROOT %a = f32[] parameter(0)\n}\n"
        )


def test_unfused_dots_count_their_own_flops():
    """Two plain dots in one loop body: each gets its own 2 x M x N x K, not the body's sum."""
    text = """HloModule m

%b (p: (f32[4,8], f32[8,16], f32[16,2])) -> f32[4,2] {
  %p = (f32[4,8]{1,0}, f32[8,16]{1,0}, f32[16,2]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=0
  %w1 = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w2 = f32[16,2]{1,0} get-tuple-element(%p), index=2
  %d1 = f32[4,16]{1,0} dot(%x, %w1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %d2 = f32[4,2]{1,0} dot(%d1, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: (f32[4,8], f32[8,16], f32[16,2])) -> f32[4,2] {
  %a = (f32[4,8]{1,0}, f32[8,16]{1,0}, f32[16,2]{1,0}) parameter(0)
  ROOT %w = f32[4,2]{1,0} while(%a), condition=%b, body=%b
}
"""
    kernels, _ = gpu_aot.loop_kernels(text)
    flops = {k.name: k.flops for k in kernels}
    assert flops == {"d1": 2 * 4 * 16 * 8, "d2": 2 * 4 * 2 * 16}


# A fusion as XLA:GPU makes them of a split-K gemm's consumer: the float32 partial sums
# f32[4,8,16] reduced over the split, converted, and a slice of 4 of the 16 columns taken
# (the V of a merged q/k/v gemm) and added to a bias; a second fusion reduces the same
# partial sums whole, as its result.
SPLIT_K = """HloModule jit_split_k, entry_computation_layout={()}

%add.f (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_v (param_0: f32[4,8,16], param_1: bf16[8,4]) -> bf16[8,4] {
  %param_0 = f32[4,8,16]{2,1,0} parameter(0)
  %param_1 = bf16[8,4]{1,0} parameter(1)
  %zero = f32[] constant(0)
  %sum = f32[8,16]{1,0} reduce(%param_0, %zero), dimensions={0}, to_apply=%add.f
  %half = bf16[8,16]{1,0} convert(%sum)
  %v = bf16[8,4]{1,0} slice(%half), slice={[0:8], [12:16]}
  ROOT %biased = bf16[8,4]{1,0} add(%v, %param_1)
}

%fused_all (param_0.1: f32[4,8,16]) -> f32[8,16] {
  %param_0.1 = f32[4,8,16]{2,1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  ROOT %sum.1 = f32[8,16]{1,0} reduce(%param_0.1, %zero.1), dimensions={0}, to_apply=%add.f
}

%body (p: (s32[], f32[4,8,16], bf16[8,4])) -> (s32[], f32[4,8,16], bf16[8,4]) {
  %p = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %partial = f32[4,8,16]{2,1,0} get-tuple-element(%p), index=1
  %bias = bf16[8,4]{1,0} get-tuple-element(%p), index=2
  %input_v_fusion = bf16[8,4]{1,0} fusion(%partial, %bias), kind=kInput, calls=%fused_v
  %input_all_fusion = f32[8,16]{1,0} fusion(%partial), kind=kInput, calls=%fused_all
  ROOT %out = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) tuple(%i, %partial, %input_v_fusion)
}

%cond (p.o: (s32[], f32[4,8,16], bf16[8,4])) -> pred[] {
  %p.o = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %two = s32[] constant(2)
  ROOT %lt.o = pred[] compare(%n.o, %two), direction=LT
}

ENTRY %main (a: (s32[], f32[4,8,16], bf16[8,4])) -> (s32[], f32[4,8,16], bf16[8,4]) {
  %a = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  ROOT %while.1 = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_a_slice_after_a_reduce_reads_its_share_of_the_partial_sums():
    kernels, _ = gpu_aot.loop_kernels(SPLIT_K)
    k = {k.name: k for k in kernels}
    # the slice keeps 4 of 16 columns: a quarter of the 4 x 8 x 16 float32 partial sums, and
    # the bias (8 x 4 bf16), written as 8 x 4 bf16
    assert k["input_v_fusion"].bytes_read == 4 * 8 * 4 * 4 + 8 * 4 * 2
    assert k["input_v_fusion"].bytes_written == 8 * 4 * 2
    # reduced whole: all the partial sums (the reduce's initial value is a constant)
    assert k["input_all_fusion"].bytes_read == 4 * 8 * 16 * 4
    assert k["input_all_fusion"].bytes_written == 8 * 16 * 4


# A cuBLAS gemm as XLA:GPU calls it (where the autotuner picks cuBLAS over its own gemm
# fusion): a custom call whose result is (the product, a workspace the call keeps).
CUBLAS = """HloModule jit_cublas, entry_computation_layout={()}

%body (p: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %p = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%p), index=2
  %custom-call.1 = (bf16[8,32]{1,0}, s8[4194304]{0}) custom-call(%x, %w), TARGET, CONFIG
  ROOT %out = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%i, %x, %w)
}

%cond (p.o: (s32[], bf16[8,64], bf16[64,32])) -> pred[] {
  %p.o = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %two = s32[] constant(2)
  ROOT %lt.o = pred[] compare(%n.o, %two), direction=LT
}

ENTRY %main (a: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %a = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  ROOT %while.1 = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) while(%a), condition=%cond, body=%body
}
""".replace("TARGET", 'custom_call_target="__cublas$lt$matmul"').replace(
    "CONFIG",
    'backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":'
    '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
    '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}',
)


def test_a_cublas_gemm_is_a_gemm_writing_its_product_not_its_workspace():
    (kernel,), _ = gpu_aot.loop_kernels(CUBLAS)
    assert kernel.kind == "gemm"
    assert (kernel.bytes_read, kernel.bytes_written) == (8 * 64 * 2 + 64 * 32 * 2, 8 * 32 * 2)
    assert kernel.flops == 2 * 8 * 32 * 64
    assert kernel.config == "cublas"


def test_gemm_config_names_the_tiling_autotuning_chose():
    def gemm(attrs):
        return gpu_aot.Instr("gemm_fusion_dot.1", "f32[8,32]{1,0}", "fusion", [], attrs)

    block_level = (
        'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion",'
        '"block_level_fusion_config":{"num_warps":"4","output_tiles":[{"sizes":["1","64","32"]}]}}}'
    )
    older = (
        'backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":'
        '{"block_m":"64","block_n":"128","block_k":"32","split_k":"4","num_stages":"3"}}}'
    )
    assert gpu_aot.gemm_config(gemm(block_level)) == "triton 1x64x32 w4"
    assert gpu_aot.gemm_config(gemm(older)) == "triton 64x128x32 k4"
    assert gpu_aot.gemm_config(gemm("")) == "triton"
    kernels, _ = gpu_aot.loop_kernels(CUBLAS)
    summary = gpu_aot.summarize(kernels, hbm_bytes_s=1e12, floor_us=2.0, peak_flops=989e12)
    assert summary["gemm_configs"] == {"cublas": 1}
