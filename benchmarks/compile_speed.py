"""`model.compile=true` against eager, per family, on this machine's CPU.

For each family (the default LSTM classifier, the CPU GPT recipe, the tiny transformer
seq2seq), a training step of the task (its `step`: forward and loss; backward; AdamW) on the
same batches of the embedded corpora, once with the net eager and once compiled as the run
compiles it (`Task.configure_model`: `nn.Module.compile`, mode `default`). At 1 thread; the
two alternate in one process; medians of the repeats. The compile time (first batches) is
reported apart.

    python -m benchmarks.compile_speed [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from hydra.utils import instantiate

from benchmarks.lstm_throughput import machine
from lmlab.config.schema import compose
from lmlab.training.build import build_task

FAMILIES = {
    "classifier (lstm)": ["model=lstm", "data=stdlib_docs"],
    "causal LM (gpt)": ["experiment=shakespeare_char_cpu", "data=stdlib_source",
                        "data/tokenizer=char", "model.sample_tokens=0"],
    "seq2seq (transformer_tiny)": ["model=transformer_tiny", "data=stdlib_summaries"],
}


def task_and_batches(overrides: list[str], steps: int, cache: str):
    cfg = compose([*overrides, f"paths.cache_dir={cache}"])
    data = instantiate(cfg.data)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(steps)]
    task = build_task(cfg, data)
    task.log = lambda *args, **kwargs: None  # no trainer: nothing to log into
    return task, batches


def step_fn(task, batches):
    optimizer = torch.optim.AdamW(task.net.parameters(), lr=1e-4)

    def run() -> float:
        task.train()
        start = time.perf_counter()
        for batch in batches:
            loss = task.step(batch, "train")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / len(batches)

    return run


def measure(name: str, overrides: list[str], steps: int, repeats: int, cache: str) -> dict:
    eager, batches = task_and_batches(overrides, steps, cache)
    compiled = copy.deepcopy(eager)
    compiled.compile_mode = "default"
    compiled.configure_model()
    run_eager, run_compiled = step_fn(eager, batches), step_fn(compiled, batches)
    start = time.perf_counter()
    run_compiled()  # compiles (and recompiles for the first shapes it sees)
    compile_s = time.perf_counter() - start
    run_eager()
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):
        times["eager"].append(run_eager())
        times["compiled"].append(run_compiled())
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"family": name, "eager_ms": 1e3 * median["eager"],
            "compiled_ms": 1e3 * median["compiled"],
            "ratio": median["eager"] / median["compiled"], "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    print("| family | eager ms/step | compiled ms/step | speed-up | first batches (compile) s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for name, overrides in FAMILIES.items():
            r = measure(name, overrides, args.steps, args.repeats, cache)
            print(f"| {r['family']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
                  f"{r['ratio']:.2f}x | {r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
