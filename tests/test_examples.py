"""Every example command of the documentation runs as written.

The commands are harvested from README.md, docs/*.md, the comments of conf/, experiments/
and sweeps/, and the docstrings of lmlab's modules: each `python -m lmlab.ENTRY ...`, with
`\\` continuations joined and the shell variables of its code block expanded. Each is a test
of its own, named by the file and line it comes from:

- `lmlab.run`: the overrides are parsed by Hydra's own parser and composed with the test
  config folder (a sweep: its first combination, and its sweep parameters must parse), then
  go through the pre-flight `check_config`.
- `lmlab.evaluate`, `lmlab.generate`, `lmlab.predict`: run for real on a tiny trained run
  (a classifier's for `predict`, unless the command gives generation options).
- `lmlab.check_parallel`: its arguments are parsed, and the run of each strategy is composed
  and checked (no multi-process training here).

Placeholders (`outputs/<date>/<time>`, `books/*.txt`, ...) are replaced by files the tests
make; a command with a placeholder not in `PLACEHOLDERS` fails, it is never skipped.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import OmegaConf, open_dict

from conftest import DATA_DIR, ROOT, run_cli, write_doc_files
from lmlab.check_parallel import RUN, SINGLE, parse
from lmlab.config.schema import CONF_DIR, register_schema
from lmlab.config.checks import check_config
from lmlab.config.user_dir import with_user_dir
from lmlab.errors import ConfigError

COMMAND = re.compile(r"python3? -m\s+lmlab\.\w+")
# Placeholders of the docs, and what stands for them here ({run}: a tiny trained run,
# {data}: the corpora folder; relative names such as books/*.txt are files of the sandbox).
PLACEHOLDERS = {
    "outputs/<date>/<time>": "{run}",
    "outputs/2026-01-01/12-00-00": "{run}",
    "outputs/sweeps/lstm_cells/JOB": "{run}",  # a sweep's job folder is a run folder
    "outputs/sweeps/lstm_cells": "{run}",
    "outputs/.../checkpoints/last.ckpt": "{run}/checkpoints/last.ckpt",
    "lmlab.evaluate RUN": "lmlab.evaluate {run}",
    "lmlab.predict RUN": "lmlab.predict {run}",
    "user_dir=PATH": "user_dir={mine}",  # a folder holding docs/extending.md's files
    "user_dir=~/mine": "user_dir={mine}",
    "user_dir=NEW_PATH": "user_dir={mine}",  # a moved user directory's new place
    "data.root=$HOME/aclImdb": "data.root={mine}",
    "paths.data_dir=...": "paths.data_dir={data}",
    # a Hugging Face model folder (a tiny random GPT-2 saved by transformers)
    "model.pretrained=FOLDER": "model.pretrained={hf}",
    "model.pretrained=checkpoints/gpt2": "model.pretrained={hf}",
    "ckpt=FOLDER": "ckpt={hf}",
    "ckpt=checkpoints/gpt2": "ckpt={hf}",
    "lmlab.evaluate checkpoints/gpt2": "lmlab.evaluate {hf}",
    "lmlab.evaluate FOLDER": "lmlab.evaluate {hf}",
}
# Values named in an optional `[key=A|B]` part.
VALUES = {"S": "1", "PATH": "{run}/checkpoints/last.ckpt"}
# Commands that cannot run here, and why: their overrides are still parsed and composed, and
# the pre-flight check may complain only of the missing GPU.
NEEDS_GPU = {
    "python -m lmlab.run strategy=gpu precision=bf16-mixed": "strategy=gpu needs CUDA",
    "python -m lmlab.run model=hf_causal_lm model.pretrained=checkpoints/gpt2 data=tinyshakespeare "
    "data.block_size=256 data.batch_size=8 trainer.max_steps=500 trainer.max_epochs=-1 "
    "strategy=gpu precision=bf16-mixed": "strategy=gpu needs CUDA",
    "python -m lmlab.run experiment=shakespeare_char_gpu": "the experiment uses strategy=gpu",
    **{f"python -m lmlab.run experiment={name}_gpu": "the experiment uses strategy=gpu"
       for name in ("multi30k_transformer", "multi30k_lstm_attn", "aeslc_transformer")},
}
GPU_PROBLEM = "a GPU was requested"
TINY_SEQ2SEQ = ["model=transformer_tiny", "data=stdlib_summaries", "data.tokenizer.vocab_size=300",
                "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                "model.max_len_a=0.0", "model.max_len_b=8"]  # short outputs: wide beams stay quick
TINY_CLASSIFIER = ["model=lstm", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
GENERATION = r"\b(max_new_tokens|temperature|top_[kp]|seed|use_cache)="  # an LM's options
TINY_LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=300",
           "trainer.max_steps=3", "trainer.max_epochs=-1", "data.train_batches=3",
           "data.val_batches=2", "model.sample_tokens=0"]


@dataclass
class Example:
    where: str  # file:line
    command: str  # as written, continuations joined and shell variables expanded


def logical_lines(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """(line number, text) of each shell line, `\\` continuations joined."""
    joined, pending, start = [], "", first_line
    for number, line in enumerate(lines, first_line):
        start = number if not pending else start
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append((start, pending + line))
            pending = ""
    return joined + ([(start, pending)] if pending else [])


def code_commands(lines: list[str], first_line: int, where: str) -> list[Example]:
    """The commands in lines of shell (a code block, or a comment), with the variables the
    block assigns (`GPT="model=..."`) expanded."""
    found, variables = [], {}
    for number, line in logical_lines(lines, first_line):
        match = COMMAND.search(line)
        assignment = re.match(r"^\s*(\w+)=(\S.*)$", line)
        if assignment and not match:
            variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
        if not match:
            continue
        # the command ends at a comment, a pipe, `&&` or `;`
        text = re.split(r"\s#|\s&&\s|\s\|\|?\s|;", line[match.start():])[0]
        for name, value in variables.items():
            text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
        found.append(Example(f"{where}:{number}", " ".join(text.split())))
    return found


def prose_commands(text: str, first_line: int, where: str) -> list[Example]:
    """The commands in `inline code` spans of prose (a span may cross a line end)."""
    return [Example(f"{where}:{first_line + text.count(chr(10), 0, m.start())}",
                    " ".join(m[1].split()))
            for m in re.finditer(r"`(python3? -m\s+lmlab\.[^`]*)`", text)]


def markdown_commands(text: str, where: str, first_line: int = 1,
                      indented_code: bool = False) -> list[Example]:
    """Commands of fenced code blocks (or of indented lines) and of inline code in prose."""
    found, prose, block, start, fenced = [], [], [], first_line, False
    for number, line in enumerate(text.splitlines(), first_line):
        fence = line.lstrip().startswith("```")
        code = not fence and (fenced or (indented_code and line.startswith("    ")))
        if code:
            start = number if not block else start
            block.append(line)
        elif block:
            found += code_commands(block, start, where)
            block = []
        fenced = fenced != fence
        prose.append("" if code or fence else line)  # keeps the line numbers
    if block:
        found += code_commands(block, start, where)
    return found + prose_commands("\n".join(prose), first_line, where)


def yaml_commands(path: Path, where: str) -> list[Example]:
    """Commands in the comments of a YAML file (a run of comment lines is one block)."""
    found, block, start = [], [], 1
    for number, line in enumerate(path.read_text().splitlines() + [""], 1):
        if line.strip().startswith("#"):
            start = number if not block else start
            block.append(line.strip().removeprefix("#"))
        elif block:
            found += code_commands(block, start, where)
            block = []
    return found


def docstring_commands(path: Path, where: str) -> list[Example]:
    """Commands in a module docstring: its indented lines are code, the rest prose."""
    module = ast.parse(path.read_text())
    doc = ast.get_docstring(module, clean=False)
    if not doc:
        return []
    return markdown_commands(doc, where, module.body[0].lineno, indented_code=True)


def harvest() -> list[Example]:
    found = markdown_commands((ROOT / "README.md").read_text(), "README.md")
    for path in sorted((ROOT / "docs").glob("*.md")):
        found += markdown_commands(path.read_text(), f"docs/{path.name}")
    # conf/experiment and conf/sweep link to experiments/ and sweeps/: each file once
    yamls = {p.resolve() for pattern in ("conf/**/*.yaml", "experiments/*.yaml", "sweeps/*.yaml")
             for p in ROOT.glob(pattern)}
    for path in sorted(yamls):
        found += yaml_commands(path, str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "lmlab").rglob("*.py")):
        found += docstring_commands(path, str(path.relative_to(ROOT)))
    return found


def variants(command: str) -> list[tuple[str, str]]:
    """(label, command) for the command as written and for each alternative of an optional
    `[key=A|B]` part (the part left out, then each A, B in its place)."""
    optional = list(re.finditer(r"\s\[([\w.+]+)=([^\]\s]+)\]", command))
    bare = re.sub(r"\s\[([\w.+]+)=([^\]\s]+)\]", "", command)
    result = [("", bare)]
    for part in optional:
        for value in part[2].split("|"):
            label = f"{part[1]}={value}"
            result.append((label, bare + f" {part[1]}={VALUES.get(value, value)}"))
    return result


EXAMPLES = [(example, label, command) for example in harvest()
            for label, command in variants(example.command)]
SLOW_ENTRIES = ("lmlab.evaluate", "lmlab.generate", "lmlab.compare", "lmlab.predict",
                "lmlab.export")


def params():
    for example, label, command in EXAMPLES:
        marks = [pytest.mark.slow] if any(e in command for e in SLOW_ENTRIES) else []
        name = f"{example.where}" + (f"[{label}]" if label else "")
        yield pytest.param(example, command, id=name, marks=marks)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working folder holding the files the docs name: books/*.txt, train.csv, test.csv,
    in.txt, texts.txt, scores.tsv, and mine/ (docs/extending.md's user directory)."""
    folder = tmp_path_factory.mktemp("docs_sandbox")
    (folder / "books").mkdir()
    (folder / "books" / "a.txt").write_text("It was the best of times.\n" * 40)
    rows = "".join(f"{word} {word} things,{label}\n" for label, word in
                   [("pos", "good"), ("neg", "bad")] * 10)
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text("text,label\n" + rows)
    (folder / "in.txt").write_text("def add(a, b):\n    return a + b\nA man rides a horse.\n")
    (folder / "texts.txt").write_text("a gripping, funny film\ndull and far too long\n")
    (folder / "scores.tsv").write_text("text\tscore\n" + "a fine film\t0.8\n" * 20)
    (folder / "train.jsonl").write_text('{"prompt": "What does len do?\\n", '
                                        '"completion": "It counts."}\n' * 30)
    write_doc_files(folder / "mine")
    return folder


def trained(folder: Path, *overrides: str) -> Path:
    """`folder`, holding a run of `python -m lmlab.run` with `overrides`."""
    done = run_cli(*overrides, f"hydra.run.dir={folder}", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def hf_folder(sandbox):
    """A tiny random GPT-2 folder, as transformers' save_pretrained writes it."""
    from hf_folders import make_folder  # needs transformers

    return make_folder("gpt2", sandbox / "hf_gpt2")


@pytest.fixture(scope="module")
def tiny_classifier_run(sandbox):
    """A tiny trained classifier run, for `lmlab.predict`."""
    return trained(sandbox / "classifier_run", *TINY_CLASSIFIER)


@pytest.fixture(scope="module")
def tiny_seq2seq_run(sandbox):
    """A tiny trained sequence-to-sequence run, for the commands that give it an input."""
    return trained(sandbox / "s2s_run", *TINY_SEQ2SEQ)


@pytest.fixture(scope="module")
def tiny_run(sandbox):
    """A tiny trained language-model run (best and last checkpoints, weights.ckpt)."""
    return trained(sandbox / "run", *TINY_LM, f"paths.cache_dir={sandbox / 'cache'}")


def substitute(command: str, request) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    if "{run}" in command:
        command = command.replace("{run}", str(request.getfixturevalue(run_for(command))))
    command = command.replace("{data}", str(DATA_DIR))
    if "{hf}" in command:
        command = command.replace("{hf}", str(request.getfixturevalue("hf_folder")))
    command = command.replace("{mine}", str(request.getfixturevalue("sandbox") / "mine"))
    left = re.findall(r"<\w+>|\.\.\.|\$\w+", command)
    assert not left, f"placeholder {left[0]!r}: add what stands for it to PLACEHOLDERS"
    return command


def run_for(command: str) -> str:
    """The fixture of the tiny run a command with `{run}` is given."""
    if "lmlab.predict" in command and not re.search(GENERATION, command):
        return "tiny_classifier_run"
    if re.search(r"\binput(_file)?=|\bmodel\.(beam|mbr)=", command):  # seq2seq options
        return "tiny_seq2seq_run"
    return "tiny_run"


@pytest.mark.parametrize("example,command", params())
def test_example_runs_as_written(example, command, sandbox, request, monkeypatch):
    monkeypatch.chdir(sandbox)  # relative file names of the docs are the sandbox's files
    # a user_dir= example extends both, as lmlab.run does; the processes that later tests
    # start must not inherit the folder
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    argv = shlex.split(substitute(command, request))
    entry, args = argv[2], argv[3:]
    if entry == "lmlab.run":
        check_run(args, NEEDS_GPU.get(example.command))
    elif entry == "lmlab.check_parallel":
        check_check_parallel(args)
    elif entry in SLOW_ENTRIES:
        run_for_real(entry, args)
    else:
        pytest.fail(f"{example.where}: no check for python -m {entry}; add one here")


def test_every_command_that_needs_a_gpu_is_still_in_the_docs():
    written = {example.command for example in harvest()}
    assert set(NEEDS_GPU) <= written, set(NEEDS_GPU) - written


def test_the_harvest_finds_the_commands_of_every_kind_of_source():
    where = {example.where.split(":")[0] for example in harvest()}
    assert {"README.md", "docs/parallelism.md", "conf/data/files.yaml", "conf/strategy/tp.yaml",
            "experiments/sst2_lstm.yaml", "sweeps/lstm_optuna.yaml",
            "lmlab/generate.py"} <= where
    continued = next(e for e in harvest() if e.where == "conf/strategy/tp.yaml:6")
    assert continued.command.endswith("trainer.devices=4 trainer.strategy.tensor_parallel_size=2")
    expanded = [e.command for e in harvest() if e.where.startswith("docs/parallelism.md:1")]
    assert "python -m lmlab.run model=gpt_tiny data=stdlib_source strategy=fsdp " \
        "trainer.devices=2" in expanded


def compose_checked(overrides: list[str], gpu_reason: str | None = None,
                    hydra_config: bool = False):
    """The run config of `overrides` after the pre-flight check (which, for a command that
    needs a GPU, may only complain of the missing GPU)."""
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=hydra_config)
    if hydra_config:
        return cfg
    with open_dict(cfg):
        cfg.paths.output_dir = "outputs/example"
        if not any(o.startswith("paths.data_dir=") for o in overrides):
            cfg.paths.data_dir = str(DATA_DIR)
    try:
        check_config(cfg)
    except ConfigError as err:
        if gpu_reason is None or torch.cuda.is_available() or \
                not all(GPU_PROBLEM in problem for problem in err.problems):
            raise
    return cfg


def first_combination(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job; every override must parse."""
    first = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            value = override.value()
            start = value.start if isinstance(value, IntervalSweep) \
                else next(override.sweep_string_iterator())
            first.append(f"{override.get_key_element()}={start}")
        else:
            first.append(override.input_line)
    return first


def check_run(args: list[str], gpu_reason: str | None) -> None:
    args = with_user_dir(args)  # as lmlab.run does: its modules importable, its conf/ searched
    overrides = first_combination([a for a in args if a not in ("-m", "--multirun")])
    compose_checked(overrides, gpu_reason)
    hydra = compose_checked(overrides, hydra_config=True).hydra
    params = OmegaConf.to_container(hydra.sweeper).get("params") or {}
    if params:  # a sweep file: its parameters parse, and its first job passes too
        swept = first_combination([f"{key}={value}" for key, value in params.items()])
        compose_checked(overrides + swept, gpu_reason)


def check_check_parallel(args: list[str]) -> None:
    options = parse(args)
    for strategy in options["strategies"]:
        layout = [] if strategy in SINGLE else [f"trainer.devices={options['devices']}"]
        compose_checked([f"strategy={strategy}", *layout, f"trainer.max_steps={options['steps']}",
                         *RUN, *options["overrides"]])


def run_for_real(entry: str, args: list[str]) -> None:
    # Few new tokens: the example is checked, not the model.
    args = [re.sub(r"^max_new_tokens=\d+$", "max_new_tokens=8", a) for a in args]
    # File names are the sandbox's (the working folder here); the command runs from ROOT.
    args = [re.sub(r"^((?:input|output)_file|out)=(?!/)", rf"\1={Path.cwd()}/", a)
            for a in args]
    for arg in args:  # an export refuses a folder that holds files: another example's
        if arg.startswith("out=") and Path(arg[4:]).is_dir():
            shutil.rmtree(arg[4:])
    if entry == "lmlab.compare" and "--out" not in args:  # the plot goes to the sandbox
        args = [*args, "--out", f"{Path.cwd()}/compare.png"]
    done = run_cli(*args, module=entry, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    if entry == "lmlab.compare":
        assert "| run |" in done.stdout or done.stdout.startswith("run,")
        assert "plot: " in done.stdout
        return
    if entry == "lmlab.generate" and any(a.startswith(("input=", "input_file=")) for a in args):
        output = next((a.split("=", 1)[1] for a in args if a.startswith("output_file=")), None)
        written = Path(output).read_text() if output else done.stdout
        inputs = 1 if any(a.startswith("input=") for a in args) else 3  # in.txt's lines
        assert written.count("\n") == inputs  # one output a line
        return
    if entry == "lmlab.evaluate":
        assert "test/loss" in done.stdout
    if entry == "lmlab.export":
        out = next(a.removeprefix("out=") for a in args if a.startswith("out="))
        assert {p.name for p in Path(out).iterdir()} >= {"config.json", "model.safetensors"}
        return
    prompt = next((a.removeprefix("prompt=") for a in args if a.startswith("prompt=")), None)
    if entry == "lmlab.generate":
        assert "tokens in" in done.stderr and done.stdout.startswith(prompt or "")
