"""The steps of `make device-check` that run in the device environment (torch, Triton, the package).

    python -m bench.device_steps STEP --result FILE --work DIR [--dry-run]

Each step writes one JSON object to ``FILE``: ``status`` (passed / failed / skipped), ``summary``
(one line) and its data. `bench.device_check` runs every step in its own process with a timeout
and collects the files; see there for what each step checks and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

#: Tolerance of bf16 results against a float64 (or torch) reference, as tests/dense.py's.
BF16_TOLERANCE = 3e-2

def _device_count(kind: str) -> int:
    import torch

    return 0 if kind == "cpu" else getattr(torch, kind).device_count()


def step_info(args) -> dict:
    import torch
    import triton

    from kernels import platform

    kind = platform.device_kind()
    info = {"device_kind": kind, "device_name": platform.device_name(), "device_count": _device_count(kind),
            "torch": torch.__version__, "triton": triton.__version__, "triton_flavor": platform.triton_flavor(),
            "interpreted": platform.is_interpreter(), "python": sys.version.split()[0]}
    if kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    elif kind == "npu":
        import torch_npu

        info.update(torch_npu=getattr(torch_npu, "__version__", "?"), cube_cores=platform.num_programs("cube"))
    summary = f"{info['device_name']} x{info['device_count']}, torch {info['torch']}, Triton {info['triton_flavor']} {info['triton']}"
    if kind == "cpu" and not args.dry_run:
        return {"status": FAILED, "summary": "no NPU or GPU visible: on a CPU-only machine run DRY_RUN=1", "info": info}
    return {"status": PASSED, "summary": summary + (" (interpreted)" if info["interpreted"] else ""), "info": info}


# ---- graph capture and replay of FlashComm2OProj (o = 1) -------------------------------------


def graph_replay_rank(args) -> dict:
    """One rank: FlashComm2OProj (o = 1, bias) captured per token count and replayed on fresh
    inputs written into the captured input buffer; every replay's output (poisoned with NaN
    before) is compared with the dense reference. Without a graph backend (CPU) the same harness
    runs the module eagerly on the same buffers."""
    import torch
    import torch.distributed as dist

    import fc2
    from autotune.timing import graph_api
    from kernels import platform

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device, dtype = platform.torch_device(), torch.bfloat16
    n, k = (48, 64 * world) if args.dry_run else (5120, 8192)  # Qwen3-32B o_proj (dry: tiny)
    token_counts = (1, 5) if args.dry_run else (1, 16, 128, 512)
    api = graph_api()
    generator = torch.Generator().manual_seed(7)
    full_weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    groups = fc2.build_groups(world) if world > 1 else None
    with torch.device(device):  # as vLLM builds its model: parameters on the device
        module = fc2.FlashComm2OProj(k, n, bias=True, params_dtype=dtype, config=fc2.FC2Config(otp_size=1),
                                     groups=groups, prefix="model.layers.0.self_attn.o_proj")
    module.weight_loader(module.weight, full_weight.to(device))
    module.weight_loader(module.bias, bias.to(device))
    k_local = k // world
    # The one-time work no capture may do (collective), as an engine does it before capturing
    # (also without a graph backend: the dry run covers it).
    from fc2.graphs import prepare_for_capture

    prepare_for_capture(module, "full", max_tokens=max(token_counts))
    rows = []
    for tokens in token_counts:
        x_static = torch.zeros(tokens, k_local, dtype=dtype, device=device)
        graph, out_static = None, None
        if api is not None:
            graph_cls, capture_context = api
            module_api = getattr(torch, platform.device_kind())
            side = module_api.Stream()
            side.wait_stream(module_api.current_stream())
            with module_api.stream(side):
                for _ in range(3):
                    module(x_static)
            module_api.current_stream().wait_stream(side)
            graph = graph_cls()
            with capture_context(graph):
                out_static = module(x_static)[0]
        errors = []
        for trial in range(3):
            x_full = torch.randn(tokens, k, generator=torch.Generator().manual_seed(100 * tokens + trial)).to(dtype)
            x_static.copy_(x_full[:, rank * k_local:(rank + 1) * k_local].to(device))
            if graph is not None:
                out_static.fill_(float("nan"))
                graph.replay()
                out = out_static
            else:
                out = module(x_static)[0]
            platform.synchronize()
            reference = x_full.double() @ full_weight.double().t() + bias.double()
            chunk = -(-tokens // world)
            expected = torch.zeros(chunk, n, dtype=torch.float64)
            part = reference[rank * chunk:(rank + 1) * chunk]
            expected[:part.shape[0]] = part
            got = out.double().cpu()
            finite = bool(torch.isfinite(got).all())
            error = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item()) if finite else float("inf")
            errors.append(error)
        rows.append({"tokens": tokens, "rank": rank, "world": world, "max_error": max(errors), "replays": len(errors),
                     "method": "graph replay" if graph is not None else "eager (no graph backend)",
                     "ok": max(errors) <= BF16_TOLERANCE})
    if groups is not None:
        groups.destroy()
    return {"rows": rows, "shape": {"N": n, "K": k, "dtype": "bfloat16"}}


def step_graph(args) -> dict:
    from kernels import platform

    kind = platform.device_kind()
    results = [graph_replay_rank(args)]
    notes = []
    worlds = [1]
    # World 2: on the device backend (one device per rank); gloo cannot be captured. On CPU (dry
    # run) the eager harness runs at world 2 on gloo too.
    if kind == "cpu" or _device_count(kind) >= 2:
        from bench.launch import run_on_ranks

        results.append(run_on_ranks(graph_replay_rank, args, world_size=2, timeout=600))
        worlds.append(2)
    else:
        notes.append("world 2 not captured: one device (two ranks would share it over gloo, which graphs cannot capture)")
    rows = [row for result in results for row in result["rows"]]
    ok = all(row["ok"] for row in rows)
    methods = sorted({row["method"] for row in rows})
    summary = (f"{'all' if ok else 'NOT all'} {len(rows)} cases within tolerance (worlds {worlds}, "
               f"T {sorted({r['tokens'] for r in rows})}; {', '.join(methods)}); worst error "
               f"{max(r['max_error'] for r in rows):.2e}")
    if kind == "cpu":
        summary += "; no graph backend on CPU: the harness ran eagerly"
    return {"status": PASSED if ok else FAILED, "summary": "; ".join([summary] + notes), "rows": rows,
            "shape": results[0]["shape"], "notes": notes}


# ---- GEMM against torch.matmul ----------------------------------------------------------------


def step_gemm(args) -> dict:
    """`bench.bench_gemm` (the GEMM against torch.matmul: receive layout and contiguous A, stream-K;
    DeepSeek-V3 TP16 and Qwen3-32B TP8, decode M = 1..64 and prefill M = 512), its rows as they are."""
    from bench import bench_gemm

    out = Path(args.work) / "bench_gemm.json"
    code = bench_gemm.main(["--out", str(out)] + (["--dry-run"] if args.dry_run else []))
    result = json.loads(out.read_text())
    rows = result["rows"]
    parts = []
    for preset, phase, m in sorted({(r["preset"], r["phase"], r["m"]) for r in rows}):
        mine = {r["path"]: r for r in rows if (r["preset"], r["phase"], r["m"]) == (preset, phase, m)}
        ratios = "/".join("-" if mine[p]["ratio_to_torch"] is None else f"{mine[p]['ratio_to_torch']:.3g}"
                          for p in mine if p != "torch.matmul")
        parts.append(f"{preset} {phase} M={m}: {ratios}")
    summary = f"x torch.matmul ({'/'.join(p for p in bench_gemm.PATHS if p != 'torch.matmul')}): {'; '.join(parts)}"
    summary += f"; {result['status']}; targets met: {result['all_targets_met']}"
    ok = code == 0 and result["numerics_ok"] is not False
    return {"status": PASSED if ok else FAILED, "summary": summary, "source": "bench.bench_gemm", "rows": rows,
            "bench_gemm": {k: v for k, v in result.items() if k != "rows"}}


# ---- the tuner and o_shared's measurement on the device -------------------------------------


def step_tuner(args) -> dict:
    from autotune.cli import main as autotune_main

    out = Path(args.work) / "autotune"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: its studies must not exist yet
    argv = ["--model", "tiny", "--world-size", "1", "--out", str(out), "--no-progress", "--cluster", "device-check"]
    argv += (["--tokens", "1", "--trials", "2", "--warmup", "0", "--repeats", "2"] if args.dry_run
             else ["--tokens", "1", "64", "--trials", "6", "--warmup", "3", "--repeats", "10"])
    code = autotune_main(argv)
    entries = []
    for table in sorted((out / "tables").glob("*,device_name=*.json")):  # not report.json
        document = json.loads(table.read_text())
        for tokens, entry in document["entries"].items():
            measured = entry["measured"]
            entries.append({"table": table.name, "tokens": int(tokens), "ms": measured.get("ms"),
                            "timing": measured.get("timing"), "statistic": measured.get("statistic")})
    timed = [e for e in entries if e["timing"] and e["statistic"]]
    ok = code == 0 and entries and len(timed) == len(entries)
    methods = sorted({e["timing"]["method"] for e in timed})
    summary = (f"python -m autotune (tiny, world 1) exit {code}; {len(entries)} table entries, timing "
               f"{', '.join(methods) or 'missing'}")
    return {"status": PASSED if ok else FAILED, "summary": summary, "entries": entries}


def step_oshared(args) -> dict:
    from bench import bench_prefetch
    from kernels import platform

    kind = platform.device_kind()
    if kind == "npu" and _device_count(kind) < 2:
        return {"status": SKIPPED, "summary": "o_shared needs 2 ranks: one NPU here, and gloo cannot carry NPU tensors"}
    if kind == "cuda" and _device_count(kind) < 2:
        os.environ["FC2_BENCH_BACKEND"] = "gloo"  # two ranks share the GPU: broadcasts through host memory
    out = Path(args.work) / "oshared"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--world-size", "2", "--out", str(out), "--transports", "broadcast"]
    argv += (["--layers", "3", "--weight-shape", "64", "128", "--compute-dim", "64", "--steps", "2",
              "--prefetch-steps", "0", "1", "--tokens", "4"] if args.dry_run else
             ["--layers", "8", "--weight-shape", "1024", "2048", "--dtype", "bfloat16", "--compute-dim", "2048",
              "--steps", "5", "--prefetch-steps", "0", "1", "2"])
    code = bench_prefetch.main(argv)
    import csv

    with open(out / "bench_prefetch.csv") as handle:
        rows = list(csv.DictReader(handle))
    shared = [r for r in rows if r["setting"].startswith("o_shared")]
    parts = [f"{r['setting']}: exposed {100 * float(r['exposed_fraction']):.1f}%, x{float(r['ratio_to_replicated']):.2f}"
             for r in shared]
    backend = os.environ.get("FC2_BENCH_BACKEND") or platform.collective_backend()
    summary = f"bench_prefetch, 2 ranks ({backend}): " + "; ".join(parts)
    return {"status": PASSED if code == 0 and shared else FAILED, "summary": summary, "rows": rows}


STEPS = {"info": step_info, "graph": step_graph, "gemm": step_gemm, "tuner": step_tuner, "oshared": step_oshared}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_steps")
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--result", required=True, help="JSON file this step writes its result to")
    parser.add_argument("--work", required=True, help="scratch directory")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import kernels  # noqa: F401  (selects the interpreter where there is no device)

    try:
        result = STEPS[args.step](args)
    except Exception as error:
        traceback.print_exc()
        result = {"status": FAILED, "summary": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]}
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["status"] != FAILED else 1


if __name__ == "__main__":
    sys.exit(main())
