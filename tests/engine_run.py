"""One vLLM engine run for the engine tests, in its own process: ``python -m tests.engine_run SPEC OUT``.

SPEC (JSON): ``model`` (a checkpoint directory), ``tp``, ``eager``, ``prompts`` (lists of token
ids), ``max_tokens``, ``one_prompt_per_call`` (one ``generate`` per prompt instead of one batch:
vLLM CPU's MLA backend lets batched requests change each other's results). The engine is built exactly as a user's ``LLM(...)`` would be: FlashComm2 is on
or off only through the environment the caller gives this process and fc2's plugin entry point
(installed in the environment). The first ``generate`` of the fresh engine is greedy with the top-5
logprobs of every generated token (fp32: the model runs in float32). OUT (JSON): the tokens and
logprobs of every prompt, start-up and generation times, and, when FlashComm2 is on, each worker's
`fc2.vllm.worker_report` before and after that generate (``collective_rpc``; the caller sets
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` so that a function can be sent).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    began = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        tensor_parallel_size=spec["tp"],
        dtype="float32",
        skip_tokenizer_init=True,
        enforce_eager=spec["eager"],
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 << 20),
        max_model_len=256,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        seed=0,
    )
    started = time.perf_counter()
    fc2_on = bool(spec.get("fc2_report"))
    if fc2_on:
        from fc2.vllm import worker_report

        before = llm.collective_rpc(worker_report)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5, detokenize=False)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    if spec.get("one_prompt_per_call"):
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    generated = time.perf_counter()
    after = llm.collective_rpc(worker_report) if fc2_on else None
    results = []
    for output in outputs:
        completion = output.outputs[0]
        results.append({
            "tokens": list(completion.token_ids),
            # per generated position: {token id: logprob} of the top 5 (and the chosen token)
            "logprobs": [{str(t): float(lp.logprob) for t, lp in position.items()} for position in completion.logprobs],
        })
    with open(out_path, "w") as handle:
        json.dump({
            "results": results,
            "startup_s": started - began,
            "generate_s": generated - started,
            "reports_before": before if fc2_on else None,
            "reports_after": after,
        }, handle)
    del llm


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # the engine's background threads must not hold the process at exit
