"""Batch-1 greedy decode with llama.cpp (llama-cpp-python) on a GGUF file, for quant_bench.

Evaluates the prompt (token ids, no BOS added), then times `--tokens` greedy steps of one token
each, and prints {"tok_s": ..., "tokens": [...]} (the tokens chosen after the prompt and after
each step), as quant_bench measures tidal-worker and candle-transformers.
"""

import argparse
import json
import os
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    prompt = [int(t) for t in a.prompt.split(",")]
    llm = Llama(
        model_path=a.model,
        n_ctx=512,
        n_batch=512,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def step(tokens: list[int]) -> int:
        llm.eval(tokens)
        # Without logits_all, llama-cpp-python keeps no scores: read the last row's logits
        # from the context, as its sampler does.
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        return int(np.argmax(logits))

    nxt = step(prompt)
    out = [nxt]
    start = time.perf_counter()
    for _ in range(a.tokens):
        nxt = step([nxt])
        out.append(nxt)
    elapsed = time.perf_counter() - start
    print(json.dumps({"tok_s": a.tokens / elapsed, "tokens": out}))


if __name__ == "__main__":
    main()
