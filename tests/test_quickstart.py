"""The README's quickstart (the reference package's own) runs unchanged against sdi."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import save_checkpoint, tiny_model

from sdi.toy import random_token_batches

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    block = re.search(
        r"<!-- quickstart -->\s*```python\n(.*?)```\s*<!-- /quickstart -->", text, re.S
    )
    assert block, "README.md lost its quickstart block"
    return block.group(1)


def test_readme_quickstart_runs_verbatim(tmp_path, monkeypatch):
    model = tiny_model()
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(tmp_path / "checkpoints" / "ckpt_0001.pt", model)
    monkeypatch.chdir(tmp_path)
    scope = {
        "model": model,
        "target_modules": model.core,
        "train_loader": random_token_batches(5, 2, 7, 19, seed=1),
        "query_loader": random_token_batches(3, 3, 7, 19, seed=2),
    }
    exec(compile(quickstart_code(), "README quickstart", "exec"), scope)
    out = scope["out"]
    assert out.sdi.shape == (5, 3, model.loop_steps) and out.tracin.shape == (5, 3)
    torch.testing.assert_close(out.tracin, out.sdi.sum(-1))
    assert torch.isfinite(out.sdi).all() and out.sdi.abs().sum() > 0
