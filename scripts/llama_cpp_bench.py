"""llama.cpp's prefill and decode speed on a GGUF file, for the side-by-side table in README.

Runs llama.cpp through llama-cpp-python with the same token ids as kvnd's criterion bench
(`crates/models/benches/forward.rs`: id_i = 100 + (37 i mod 20000)), flash attention on,
the thread count given (default 2, this project's machine). Prints one line per figure.

    python3 scripts/llama_cpp_bench.py ~/.cache/kvnd/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import statistics
import time

from llama_cpp import Llama


def ids(n):
    return [100 + (i * 37) % 20000 for i in range(n)]


def prefill(llm, n, reps):
    times = []
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids(n))
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def decode(llm, ctx, steps):
    llm.reset()
    llm.eval(ids(ctx))
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([42])
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    llm = Llama(
        model_path=a.model,
        n_ctx=8192 + 128,
        n_batch=512,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        flash_attn=True,
        verbose=False,
    )
    for n in (512, 2048, 4096):
        print(f"llama.cpp prefill/{n}: {prefill(llm, n, a.reps):.1f} tok/s")
    for ctx in (2048, 8000):
        print(f"llama.cpp decode/at-{ctx}: {decode(llm, ctx, 32):.1f} tok/s")


if __name__ == "__main__":
    main()
