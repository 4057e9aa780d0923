"""Benchmark: W8A8 FlashComm2 against the bf16 path, vllm-ascend's W8A8 path and TP's reduce-scatter.

    python -m bench.bench_w8a8                        # CPU default: 2 local ranks, scaled shapes
    torchrun --nproc-per-node 8 -m bench.bench_w8a8 --scale 1 --tokens 512 4096

Three tables, side by side in one run:

1. **Bytes per rank on the wire** at the presets' *full* shapes (DeepSeek-V3 at TP16, Qwen3-32B at
   TP8; the busiest rank, i.e. the one whose chunk is full, as the planner counts): FlashComm2's
   all-to-all in bf16, W8A8 static (``K_l`` int8 bytes per token), W8A8 dynamic (the packed row,
   `kernels.quantize.packed_row_bytes`: int8 values + the fp32 scale, 16-byte aligned),
   vllm-ascend's W8A8 dynamic (it all-to-alls bf16 and quantizes after), and TP's reduce-scatter
   of the bf16 output. Pure arithmetic of the buffers the kernels send (the same formulas the
   timed run checks against its real send buffers).
2. **Time** at shapes divided by ``--scale`` on the launched ranks: ``all_to_all_gemm``
   sequential in bf16, W8A8 static and dynamic, vllm-ascend's W8A8 path
   (`kernels.reference_all_to_all_w8a8`), the all-to-all alone in bf16 and int8. With the real
   send buffers' bytes.
3. **Accuracy** of each path at the scaled shapes, per rank's chunk, relative to max |y|: against
   the float64 product of the dequantized operands (what an exact int8 path gives) and against the
   float64 product of the *unquantized* model (bf16 x and W), next to the bf16 path's own; and the
   quantization error itself (dequantized against unquantized, both float64, no rounding of the
   output). Note: Triton's interpreter stores fp32 -> bf16 by truncation (a device rounds to
   nearest), so interpreted bf16 outputs carry up to twice the rounding error.

On a CPU-only machine Triton runs in its interpreter: timings measure Python, not a kernel.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

from bench.bench_a2a_gemm import PRESETS, _timed
from bench.launch import add_rank_arguments, resolve_device_defaults, run_on_ranks


@dataclass
class BytesRow:
    preset: str
    tokens: int
    group: int
    fc2_bf16: int
    w8a8_static: int
    w8a8_dynamic: int
    vllm_ascend_w8a8_dynamic: int
    tp_reduce_scatter: int


def wire_bytes(preset: str, tokens: int) -> BytesRow:
    """Bytes the busiest rank sends per o_proj at the preset's full shape (see the module doc)."""
    from kernels.quantize import packed_row_bytes

    n, k, tp = PRESETS[preset]
    k_local = k // tp
    chunk = -(-tokens // tp)
    # A rank sends its heads of every other rank's chunk (uneven splits, no padding): the busiest
    # is the one whose own chunk is smallest (the last, or one past T).
    others = tokens - max(0, min(chunk, tokens - (tp - 1) * chunk))
    return BytesRow(preset, tokens, tp, others * k_local * 2, others * k_local,
                    others * packed_row_bytes(k_local, True), (tp - 1) * chunk * k_local * 2,
                    (tp - 1) * chunk * n * 2)


@dataclass
class Row:
    preset: str
    tokens: int
    group: int
    k_local: int
    n: int
    path: str
    ms: float
    bytes_sent_per_rank: int
    error_vs_dequantized: float = float("nan")
    error_vs_float_model: float = float("nan")
    #: The float64 product of the dequantized operands against the float model's: what the
    #: quantization itself costs, without any output rounding.
    quantization_error: float = float("nan")
    note: str = ""


def _problem(seed: int, tokens: int, k_total: int, n: int, device):
    """bf16 x and W, W quantized per output channel (symmetric), the static scale from x's range."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(tokens, k_total, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(n, k_total, generator=gen) / k_total**0.5).to(torch.bfloat16)
    weight_scale = (weight.float().abs().amax(dim=1) / 127).clamp_min(1e-8)
    weight_q = torch.round(weight.float() / weight_scale[:, None]).clamp(-128, 127).to(torch.int8)
    input_scale = (x_full.float().abs().max() / 127).reshape(1).to(torch.bfloat16)
    return x_full.to(device), weight.to(device), weight_q.to(device), weight_scale.to(device), input_scale.to(device)


def _dequantized_reference(x_full, weight_q, weight_scale, input_scale, size: int, rank: int, dynamic: bool):
    import torch

    tokens, k_total = x_full.shape
    k_local = k_total // size
    if dynamic:
        blocks = []
        for p in range(size):
            xs = x_full[:, p * k_local : (p + 1) * k_local].double()
            scale = xs.abs().amax(dim=1) / 127
            q = torch.round((xs / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).clamp(-128, 127))
            blocks.append(q * scale[:, None])
        x = torch.cat(blocks, dim=1)
    else:
        reciprocal = (1 / input_scale).to(torch.bfloat16).double()
        x = torch.round((x_full.double() * reciprocal).clamp(-128, 127)) * input_scale.double()
    y = x @ (weight_q.double() * weight_scale.double()[:, None]).t()
    return _chunk(y, size, rank)


def _chunk(y, size: int, rank: int):
    import torch

    chunk = -(-y.shape[0] // size)
    out = torch.zeros(chunk, y.shape[1], dtype=torch.float64)
    rows = y[rank * chunk : (rank + 1) * chunk].cpu()
    out[: rows.shape[0]] = rows
    return out


def _error(out, expected) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (out.double().cpu() - expected).abs().max().item() / scale


def _bench_rank(args) -> list[Row]:
    import torch
    import torch.distributed as dist

    import kernels
    from kernels import platform
    from kernels.quantize import quantize_rows

    size, rank = dist.get_world_size(), dist.get_rank()
    device = platform.torch_device()
    interpreted = "Triton interpreted" if platform.is_interpreter() else ""
    rows: list[Row] = []
    for preset in args.presets:
        n_full, k_full, preset_tp = PRESETS[preset]
        k_local = max(16, k_full // preset_tp // args.scale)
        n = max(16, n_full // args.scale)
        for tokens in args.tokens:
            x_full, weight, weight_q, weight_scale, input_scale = _problem(tokens, tokens, size * k_local, n, device)
            x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
            static = kernels.W8A8((input_scale.float() * weight_scale).float(),
                                  (1 / input_scale).to(torch.bfloat16).float())
            dynamic = kernels.W8A8(weight_scale.float())
            chunk = -(-tokens // size)
            mine = max(0, min(chunk, tokens - rank * chunk))
            common = dict(preset=preset, tokens=tokens, group=size, k_local=k_local, n=n)
            model = _chunk(x_full.double() @ weight.double().t(), size, rank)
            runs = {
                "bf16 sequential": (lambda: kernels.all_to_all_gemm(x, weight, schedule="sequential"), None, None,
                                    (tokens - mine) * k_local * 2),
                "W8A8 static sequential": (lambda: kernels.all_to_all_gemm(x, weight_q, schedule="sequential",
                                                                           w8a8=static), static, False,
                                           (tokens - mine) * quantize_rows(x, static).shape[1]),
                "W8A8 dynamic sequential": (lambda: kernels.all_to_all_gemm(x, weight_q, schedule="sequential",
                                                                            w8a8=dynamic), dynamic, True,
                                            (tokens - mine) * quantize_rows(x, dynamic).shape[1]),
                "vllm-ascend W8A8 static (a2a int8 + copy + int matmul)": (
                    lambda: kernels.reference_all_to_all_w8a8(x, weight_q, w8a8=static), static, False,
                    (size - 1) * chunk * k_local),
                "vllm-ascend W8A8 dynamic (a2a bf16 + copy + quantize + int matmul)": (
                    lambda: kernels.reference_all_to_all_w8a8(x, weight_q, w8a8=dynamic), dynamic, None,
                    (size - 1) * chunk * k_local * 2),
            }
            for path, (fn, spec, dynamic_scales, sent) in runs.items():
                out = fn()
                error_dq = quantization = float("nan")
                if spec is not None and dynamic_scales is not None:
                    expected = _dequantized_reference(x_full, weight_q, weight_scale, input_scale, size, rank,
                                                      dynamic_scales)
                    error_dq, quantization = _error(out, expected), _error(expected, model)
                ms = _timed(fn, args.warmup, args.repeats)
                note = interpreted if "sequential" in path else ""
                rows.append(Row(**common, path=path, ms=ms, bytes_sent_per_rank=sent, error_vs_dequantized=error_dq,
                                error_vs_float_model=_error(out, model), quantization_error=quantization, note=note))
            for label, payload in (("bf16", x), ("int8 (dynamic rows)", quantize_rows(x, dynamic))):
                splits = [max(0, min(chunk, tokens - p * chunk)) for p in range(size)]
                received = torch.empty(size * mine, payload.shape[1], dtype=payload.dtype, device=device)
                ms = _timed(lambda: dist.all_to_all_single(received, payload, [mine] * size, splits),
                            args.warmup, args.repeats)
                rows.append(Row(**common, path=f"comm alone: all_to_all {label}", ms=ms,
                                bytes_sent_per_rank=(tokens - mine) * payload.shape[1] * payload.element_size()))
    return rows


def print_tables(bytes_rows: list[BytesRow], rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    table = Table(title="bytes sent per rank per o_proj, full model shapes (the busiest rank)")
    for col in ("preset", "T", "S", "FC2 bf16", "FC2 W8A8 static", "FC2 W8A8 dynamic", "vllm-ascend W8A8 dynamic",
                "TP reduce-scatter (bf16)", "static / bf16", "dynamic / bf16"):
        table.add_column(col)
    for r in bytes_rows:
        base = r.fc2_bf16 or 1
        table.add_row(r.preset, str(r.tokens), str(r.group), str(r.fc2_bf16), str(r.w8a8_static), str(r.w8a8_dynamic),
                      str(r.vllm_ascend_w8a8_dynamic), str(r.tp_reduce_scatter), f"{r.w8a8_static / base:.3f}",
                      f"{r.w8a8_dynamic / base:.3f}")
    console.print(table)
    table = Table(title=title)
    for col in ("preset", "T", "S", "K_l", "N", "path", "ms", "bytes sent/rank", "err vs dequantized",
                "err vs float model", "quantization err (fp64)", "note"):
        table.add_column(col)

    def figure(value: float) -> str:
        return "" if value != value else f"{value:.2e}"

    for r in rows:
        table.add_row(r.preset, str(r.tokens), str(r.group), str(r.k_local), str(r.n), r.path, f"{r.ms:.3f}",
                      str(r.bytes_sent_per_rank), figure(r.error_vs_dequantized), figure(r.error_vs_float_model),
                      figure(r.quantization_error), r.note)
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_w8a8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--bytes-tokens", nargs="+", type=int, default=[1, 64, 1024, 4096, 16384],
                        help="token counts of the bytes table (full shapes, arithmetic only)")
    add_rank_arguments(parser, out_help="directory for the CSVs")
    args = parser.parse_args(argv)
    resolve_device_defaults(args)
    from kernels import platform

    bytes_rows = [wire_bytes(preset, tokens) for preset in args.presets for tokens in args.bytes_tokens]
    rows = run_on_ranks(_bench_rank, args, world_size=args.world_size, timeout=args.timeout)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    mode = "compiled" if not platform.is_interpreter() else "INTERPRETED (Triton timings measure Python, not hardware)"
    print_tables(bytes_rows, rows, f"W8A8 FlashComm2 — {platform.device_name()}, Triton {mode}")
    os.makedirs(args.out, exist_ok=True)
    for name, items, kind in (("bench_w8a8_bytes.csv", bytes_rows, BytesRow), ("bench_w8a8.csv", rows, Row)):
        path = os.path.join(args.out, name)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(kind.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(r.__dict__ for r in items)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
