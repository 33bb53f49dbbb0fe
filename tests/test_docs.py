"""The documentation runs as written: every Python snippet of the README, each in a fresh namespace
(none needs CUDA), and the guide's nanoGPT shakespeare_char command, whose flags resolve to the run
that examples/shakespeare_char.toml describes."""

import re
import shlex
from pathlib import Path

import pytest

from sqt.accounting import param_count
from sqt.cli import parser
from sqt.cli_train import resolve_train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = compile(SNIPPETS[index], f"README.md python snippet {index}", "exec")
    exec(code, {"__name__": f"readme_snippet_{index}"})


def _guide_command(start: str) -> list[str]:
    """The guide's shell command beginning with `start`, its continuation lines joined."""
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    text = guide[guide.index(start):]
    lines = []
    for line in text.splitlines():
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(lines))


def test_the_guides_shakespeare_char_flags_are_the_example_run_file():
    from_flags = resolve_train(parser().parse_args(_guide_command("sqt train --preset medium")[1:]))
    from_file = resolve_train(parser().parse_args(
        ["train", "--config", str(ROOT / "examples" / "shakespeare_char.toml")]))
    assert from_flags[0] == from_file[0] and from_flags[3] == from_file[3]
    flags_train, file_train = from_flags[4], from_file[4]
    assert flags_train.to_dict() == {**file_train.to_dict(), "out_dir": flags_train.out_dir}
    model, train = from_file[3], from_file[4]
    # nanoGPT's config/train_shakespeare_char.py.
    assert (model.n_layers, model.n_heads, model.d_model, model.d_ff, model.dropout,
            model.tie_embeddings) == (6, 6, 384, 1536, 0.2, True)
    assert (train.steps, train.batch_size, train.seq_len, train.lr, train.min_lr, train.warmup,
            train.beta2) == (5000, 64, 256, 1e-3, 1e-4, 100, 0.99)
    # nanoGPT prints 10.65M: no biases, and its count leaves out the position embeddings.
    assert 10.6e6 < param_count(model) < 10.9e6
