"""The ``sdi`` command line (sdi/cli.py, sdi/cli_inputs.py, sdi/data.py, sdi/lm_loss.py).

End to end on the inputs of ``examples/make_tiny_hf_model.py`` (a tiny HRM-text causal LM saved
with ``save_pretrained``, a tokenizer built locally, two Trainer-style checkpoint folders, JSONL
data): ``sdi attribute`` in-process and as ``python -m sdi`` gives the JSON of the Python API's
``top_influences``; a factory model (the multi-layer loop of tests/looped_lm.py) with
``target_modules`` found automatically; bad inputs exit 2 with the fix named and nothing written.
The HTML report beside the JSON (sdi/cli_report.py): its embedded data against the data files and
the JSON, ``sdi report`` rebuilding the same page, ``--report`` / ``--no-report``, bad JSON.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import looped_lm
import pytest
import torch
import transformers
from conftest import tiny_model
from report_cases import make_top

from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.cli import main
from sdi.cli_report import PAD_LABEL, attribute_report_data, example_texts, example_tokens
from sdi.data import Batches, DataError, read_records, token_ids
from sdi.lm_loss import causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "examples" / "make_tiny_hf_model.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from looped_lm.one_thread()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The quickstart's inputs, made once: {name: path}."""
    spec = importlib.util.spec_from_file_location("make_tiny_hf_model", MAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(tmp_path_factory.mktemp("tiny"))


def _attribute(tiny, out, *extra):
    return [
        "attribute",
        "--model",
        str(tiny["model"]),
        "--checkpoints",
        str(tiny["model"].parent / "checkpoint-*"),
        "--train",
        str(tiny["train"]),
        "--query",
        str(tiny["query"]),
        "--target-modules",
        "model.L_module",
        "-k",
        "3",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _logged_lr(folder: Path) -> float:
    """The learning rate logged at the folder's global step (read here, not by sdi)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return next(
        e["learning_rate"] for e in state["log_history"] if e["step"] == state["global_step"]
    )


def _python_api_top(tiny, k=3):
    """top_influences on the same inputs, built without sdi's command-line code."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"], local_files_only=True)

    def loader(path):
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        out = []
        for i in range(0, len(texts), 8):
            enc = tokenizer(texts[i : i + 8], padding=True, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    def load(path):  # save_pretrained renames HRM-text's fused weights: load as the model loads
        return {"model_state_dict": type(model).from_pretrained(path).state_dict()}

    folders = [tiny["checkpoint-2"], tiny["checkpoint-4"]]
    est = ProjectedTracInSDI(model=model, target_modules=model.model.L_module, seed=0)
    top = est.top_influences(
        k=k,
        checkpoints=[CheckpointSpec(str(f), _logged_lr(f)) for f in folders],
        train_loader=loader(tiny["train"]),
        query_loader=loader(tiny["query"]),
        loss_fn=causal_lm_loss,
        load_checkpoint_fn=load,
    )
    est.close()
    return top


def _assert_top_equal(got: dict, top, rtol=0.0):
    for side in ("most", "least"):
        assert got[f"{side}_indices"] == getattr(top, f"{side}_indices").tolist()
        for what in ("tracin", "sdi"):
            want = getattr(top, f"{side}_{what}")
            torch.testing.assert_close(
                torch.tensor(got[f"{side}_{what}"], dtype=want.dtype), want, rtol=rtol, atol=0
            )


def _page_data(path: Path) -> dict:
    """The report data embedded in a report page (as tests/test_report.py reads it)."""
    found = re.search(
        r'<script id="sdi-data" type="application/json">(.*?)</script>', path.read_text()
    )
    return json.loads(found.group(1))


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_attribute_json_equals_the_python_api(tiny, tmp_path, capsys):
    out = tmp_path / "top.json"
    assert main(_attribute(tiny, out)) == 0
    result = json.loads(out.read_text())
    top = _python_api_top(tiny)
    _assert_top_equal(result["top"], top)
    # Every setting needed to reproduce it.
    assert result["settings"]["projection_size"] == 2048 and result["settings"]["seed"] == 0
    assert [c["path"] for c in result["checkpoints"]] == [
        str(tiny["checkpoint-2"]),
        str(tiny["checkpoint-4"]),
    ]
    for entry in result["checkpoints"]:
        assert entry["eta"] == _logged_lr(Path(entry["path"]))
        assert entry["eta_source"].startswith("trainer_state.json")
    assert result["step_plan"]["steps"] == 4  # L_module: 2 H cycles x 2 L cycles with gradients
    assert result["train"]["examples"] == 24 and result["query"]["examples"] == 4
    assert result["selected_modules"] == ["model.L_module"]
    assert "top 3 of 24 train examples for 4 queries" in capsys.readouterr().err
    # The report beside it (no temporary file left), holding what the JSON holds.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top.html", "top.json"]
    plain = tmp_path / "plain"
    plain.write_text("")  # both get the permissions of any new file (not mkstemp's private ones)
    assert {(tmp_path / n).stat().st_mode for n in ("top.html", "top.json")} == {
        plain.stat().st_mode
    }
    plain.unlink()
    page = _page_data(tmp_path / "top.html")
    assert page == result["report"]
    assert not page["has_se"] and not page["has_explanations"]
    assert result["step_plan"]["labels"] == ["pass 0", "pass 1", "pass 2", "pass 3"]
    assert page["step_labels"] == ["0", "1", "2", "3"]  # short column heads
    train_texts, query_texts = _texts(tiny["train"]), _texts(tiny["query"])
    assert [q["text"] for q in page["queries"]] == query_texts
    for j, q in enumerate(page["queries"]):
        for side in ("most", "least"):
            rows = q[side]
            assert len(rows) == 3
            assert [r["train"] for r in rows] == getattr(top, f"{side}_indices")[j].tolist()
            for r, row in enumerate(rows):
                want = float(getattr(top, f"{side}_tracin")[j, r])
                assert row["tracin"] == pytest.approx(want, rel=1e-3)  # 4 digits kept
                assert page["train"][str(row["train"])]["text"] == train_texts[row["train"]]


def test_python_m_sdi_gives_the_same_json_with_explanations_and_errors(tiny, tmp_path):
    first, second = tmp_path / "in_process.json", tmp_path / "subprocess.json"
    extra = ("--explain", "--standard-errors", "-k", "1")  # explaining costs 1 + T passes a batch
    assert main(_attribute(tiny, first, *extra)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "sdi", *_attribute(tiny, second, *extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (json.loads(p.read_text()) for p in (first, second))
    assert a["top"]["most_indices"] == b["top"]["most_indices"]
    for key in ("most_tracin", "least_sdi", "most_tracin_se"):
        torch.testing.assert_close(torch.tensor(b["top"][key]), torch.tensor(a["top"][key]))
    se = torch.tensor(a["top"]["most_tracin_se"])
    assert se.shape == (4, 1) and bool((se > 0).all())
    pair = a["explanations"]["most"][0][0]
    assert pair["query"] == 0 and pair["train"] == a["top"]["most_indices"][0][0]
    sdi = torch.tensor(pair["sdi"])
    torch.testing.assert_close(sdi, torch.tensor(a["top"]["most_sdi"][0][0]), rtol=1e-4, atol=1e-9)
    for split in ("positions_train", "positions_query", "by_parameter"):
        torch.testing.assert_close(torch.tensor(pair[split]).sum(0), sdi, rtol=1e-4, atol=1e-9)
    # The report: SE and explained heatmaps, one token label per (padded) position.
    page = _page_data(tmp_path / "in_process.html")
    assert page == a["report"] and page["has_se"] and page["has_explanations"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"], local_files_only=True)
    for j, q in enumerate(page["queries"]):
        row = q["most"][0]
        assert row["se"] == pytest.approx(a["top"]["most_tracin_se"][j][0], rel=1e-3)
        train = page["train"][str(row["train"])]
        for labels, heat, text in (
            (q["tokens"], row["pos_query"], q["text"]),
            (train["tokens"], row["pos_train"], train["text"]),
        ):
            assert len(labels) == len(heat)  # T of the padded batch
            words = [t for t in labels if t != PAD_LABEL]
            assert words == [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]
            assert labels == words + [PAD_LABEL] * (len(labels) - len(words))
    # `sdi report` rebuilds the same page from the JSON alone.
    moved = tmp_path / "elsewhere.json"
    moved.write_text(first.read_text())
    assert main(["report", str(moved)]) == 0
    assert (tmp_path / "elsewhere.html").read_bytes() == (tmp_path / "in_process.html").read_bytes()
    assert main(["report", str(first), "-o", str(tmp_path / "again.html"), "--page-size", "3"]) == 0
    assert _page_data(tmp_path / "again.html") == page


def test_auto_on_the_hrm_folder_is_ambiguous_exit_2_and_nothing_written(tiny, tmp_path, capsys):
    out = tmp_path / "top.json"
    args = _attribute(tiny, out)
    args[args.index("--target-modules") + 1] = "auto"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.L_module  HrmTextStack: 4 uses" in err and "model.H_module" in err
    assert "--target-modules model.L_module" in err and "Traceback" not in err
    assert not out.exists()


def _factory_inputs(tmp_path):
    """Token-id JSONL data and two .pt checkpoints of tests/looped_lm.py's LoopedLM()."""
    gen = torch.Generator().manual_seed(0)
    for name, n in (("train", 6), ("query", 2)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                length = int(torch.randint(3, 9, (1,), generator=gen))
                ids = torch.randint(0, 23, (length,), generator=gen).tolist()
                f.write(json.dumps({"ids": ids}) + "\n")
    for step in (1, 2):
        torch.manual_seed(step)
        torch.save(
            {"model_state_dict": looped_lm.LoopedLM().state_dict()}, tmp_path / f"c{step}.pt"
        )


def test_factory_model_with_auto_core_equals_the_python_api(tmp_path, capsys):
    _factory_inputs(tmp_path)
    out = tmp_path / "top.json"
    args = ["attribute", "--model", "looped_lm:LoopedLM", "--checkpoints", str(tmp_path / "c*.pt")]
    args += ["--train", str(tmp_path / "train.jsonl"), "--query", str(tmp_path / "query.jsonl")]
    args += ["--ids-field", "ids", "-k", "2", "--projection-size", "256", "--batch-size", "4"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["selected_modules"] == ["layers.0", "layers.1"]
    assert result["step_plan"]["steps"] == 3 and result["step_plan"]["modules"][
        "layers.0.gate"
    ] == [1, 2]
    assert "looped core (target_modules='auto'): layers.0, layers.1" in capsys.readouterr().err
    assert [c["eta"] for c in result["checkpoints"]] == [1.0, 1.0]  # no learning rate stored

    model = looped_lm.LoopedLM()
    rows = {
        name: [json.loads(line)["ids"] for line in (tmp_path / f"{name}.jsonl").open()]
        for name in ("train", "query")
    }
    batches = {name: list(Batches(r, 4, 0, "cpu")) for name, r in rows.items()}
    est = ProjectedTracInSDI(model=model, target_modules=list(model.layers), projection_size=256)
    top = est.top_influences(
        k=2,
        checkpoints=[str(tmp_path / "c1.pt"), str(tmp_path / "c2.pt")],
        train_loader=batches["train"],
        query_loader=batches["query"],
        loss_fn=causal_lm_loss,
    )
    _assert_top_equal(result["top"], top)


def doubled_loss(model, batch):
    """A user's own loss for --loss test_cli:doubled_loss: twice the default one."""
    return 2 * causal_lm_loss(model, batch)


def test_own_loss_plugs_in(tmp_path):
    _factory_inputs(tmp_path)
    args = ["attribute", "--model", "looped_lm:LoopedLM", "--checkpoints", str(tmp_path / "c1.pt")]
    args += ["--train", str(tmp_path / "train.jsonl"), "--query", str(tmp_path / "query.jsonl")]
    args += ["--ids-field", "ids", "-k", "2", "--exact", "--no-progress"]
    results = {}
    for loss in (None, "test_cli:doubled_loss"):
        out = tmp_path / f"{loss}.json"
        assert main([*args, "--out", str(out)] + (["--loss", loss] if loss else [])) == 0
        results[loss] = json.loads(out.read_text())
    plain, doubled = results[None], results["test_cli:doubled_loss"]
    assert doubled["loss"]["name"] == "test_cli:doubled_loss"
    assert doubled["top"]["most_indices"] == plain["top"]["most_indices"]
    # Both gradients double: every score is 4 times the default loss's.
    torch.testing.assert_close(
        torch.tensor(doubled["top"]["most_tracin"]), 4 * torch.tensor(plain["top"]["most_tracin"])
    )


def test_train_store_is_written_then_read_with_the_same_result(tmp_path):
    _factory_inputs(tmp_path)
    store = tmp_path / "store"
    args = ["attribute", "--model", "looped_lm:LoopedLM", "--checkpoints", str(tmp_path / "c1.pt")]
    args += ["--train", str(tmp_path / "train.jsonl"), "--query", str(tmp_path / "query.jsonl")]
    args += ["--ids-field", "ids", "-k", "2", "--projection-size", "128", "--no-progress"]
    args += ["--train-store", str(store)]
    custom = tmp_path / "pages" / "custom.html"
    custom.parent.mkdir()
    assert main([*args, "--out", str(tmp_path / "a.json"), "--report", str(custom)]) == 0
    assert custom.is_file() and not (tmp_path / "a.html").exists()

    def files():
        return {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    written = files()
    assert written  # the train features are on disk
    assert main([*args, "--out", str(tmp_path / "b.json"), "--no-report"]) == 0
    assert not (tmp_path / "b.html").exists()  # no page, but its data in the JSON
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["top"] == b["top"] and a["settings"]["train_store"] == str(store)
    assert files() == written  # read, not written again
    # Token ids and no tokenizer: the report shows the ids as text.
    ids = [json.loads(line)["ids"] for line in (tmp_path / "query.jsonl").open()]
    assert [q["text"] for q in b["report"]["queries"]] == [" ".join(map(str, r)) for r in ids]
    assert _page_data(custom) == a["report"] == b["report"]
    assert main(["report", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.html").read_bytes() == custom.read_bytes()


BAD = [
    (["--model", "no/such/folder"], "no such folder"),
    (["--model-class", "NoSuchModel"], "--model-class 'NoSuchModel': transformers"),
    (["--text-field", "body"], "no field 'body'"),
    (["--checkpoints", "nowhere/checkpoint-*"], "the pattern matches nothing"),
    (["--target-modules", "model.M_module"], "has no submodule 'model.M_module'"),
    (["--train", "train.txt"], "unknown data format '.txt'"),
    (["--k", "0"], "--k must be positive"),
    (["--report", "no/such/folder/r.html"], "the folder no/such/folder does not exist"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_exits_2_naming_the_fix_and_keeps_the_old_result(
    tiny, tmp_path, capsys, change, message
):
    out = tmp_path / "top.json"
    out.write_text("old")
    args = _attribute(tiny, out)
    option, value = change
    if option == "--model-class":
        args += change
    else:
        if option == "--train":
            value = str(tmp_path / value)
            Path(value).write_text("x\n")
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) <= [
        "top.json",
        "train.txt",
    ]


def test_folder_without_config_and_checkpoint_of_another_model(tiny, tmp_path, capsys):
    args = _attribute(tiny, tmp_path / "top.json")
    args[args.index("--model") + 1] = str(tmp_path)
    assert main(args) == 2
    assert "without config.json" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"model_state_dict": looped_lm.LoopedLM().state_dict()}, other)
    args = _attribute(tiny, tmp_path / "top.json")
    args[args.index("--checkpoints") + 1] = str(other)
    assert main(args) == 2
    assert "does not fit the model HrmTextForCausalLM" in capsys.readouterr().err


def test_unknown_model_type_and_a_file_as_model(tiny, tmp_path, capsys):
    folder = tmp_path / "strange"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    args = _attribute(tiny, tmp_path / "top.json")
    args[args.index("--model") + 1] = str(folder)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "AutoModelForCausalLM cannot load it" in err and "upgrade transformers" in err
    args[args.index("--model") + 1] = str(tiny["model"] / "model.safetensors")
    assert main(args) == 2
    assert "is a file: pass the folder holding it" in capsys.readouterr().err


def test_missing_optional_reader_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=re.escape("pip install 'sdi[data]'")):
        read_records(path)


def test_every_format_gives_the_same_examples(tmp_path):
    rows = [{"text": "a b", "ids": [3, 1, 4]}, {"text": "c", "ids": [1, 5]}]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "ids"])
        writer.writeheader()
        writer.writerow({"text": "a b", "ids": "3 1 4"})
        writer.writerow({"text": "c", "ids": "[1, 5]"})
    import datasets
    import pyarrow
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "d_dict")
    )
    words = {"a": 7, "b": 8, "c": 9}
    for name in ("d.jsonl", "d.csv", "d.parquet", "d_hf"):
        records = read_records(tmp_path / name)
        assert token_ids(records, source=name, ids_field="ids") == [[3, 1, 4], [1, 5]], name
        tokenize = lambda t: [words[w] for w in t.split()]  # noqa: E731
        assert token_ids(records, source=name, text_field="text", tokenize=tokenize) == [
            [7, 8],
            [9],
        ]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "d_dict" / "train"))):
        read_records(tmp_path / "d_dict")
    with pytest.raises(DataError, match="example 1: 2 token\\(s\\); the loss needs at least 3"):
        token_ids(read_records(tmp_path / "d.jsonl"), source="d", ids_field="ids", min_length=3)


def test_causal_lm_loss_ignores_padding():
    model = tiny_model()  # causal (tests/looped_lm.py's depthwise conv is not: it reads ahead)
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11]]
    padded = causal_lm_loss(model, Batches(rows, 3, 0, "cpu").collate(rows))
    alone = torch.cat([causal_lm_loss(model, {"input_ids": torch.tensor([r])}) for r in rows])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    # The loss by hand for the first row: mean next-token cross-entropy.
    logits = model(torch.tensor([rows[0]]))[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(rows[0][1:]))
    torch.testing.assert_close(alone[0], want)


def test_info_prints_backend_model_and_the_core(tiny, tmp_path, capsys):
    base = ["info", "--model", str(tiny["model"])]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "kernel backend: torch" in text and "HrmTextForCausalLM" in text
    assert "model.L_module  HrmTextStack: 4 uses" in text  # the ambiguity, shown, not fatal
    assert main([*base, "--target-modules", "model.L_module", "--data", str(tiny["query"])]) == 0
    assert "StepPlan: 4 steps" in capsys.readouterr().out
    _factory_inputs(tmp_path)
    factory = ["info", "--model", "looped_lm:LoopedLM", "--data", str(tmp_path / "query.jsonl")]
    assert main([*factory, "--ids-field", "ids"]) == 0
    text = capsys.readouterr().out
    assert "looped core (target_modules='auto'): layers.0, layers.1 -- 3 uses each" in text
    assert "StepPlan: 3 steps" in text


def test_info_finds_albert_s_shared_group_in_a_model_folder(tmp_path, capsys):
    from test_hf_models import _albert

    torch.manual_seed(0)
    _albert()[0].save_pretrained(tmp_path / "albert")
    args = ["info", "--model", str(tmp_path / "albert"), "--model-class", "AlbertForMaskedLM"]
    assert main([*args, "--seq-len", "8"]) == 0
    text = capsys.readouterr().out
    assert "AlbertForMaskedLM" in text
    assert "looped core (target_modules='auto'): albert.encoder.albert_layer_groups.0" in text
    assert "StepPlan: 3 steps" in text


@pytest.mark.parametrize("command", [[], ["attribute"], ["info"], ["report"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage: sdi" in text
    if command == ["attribute"]:
        for option in ("--projection-size", "--train-store", "--explain", "--standard-errors"):
            assert option in text
        assert "--no-report" in text and "--report PATH" in text
    if command == ["report"]:
        assert "results" in text and "-o OUT, --out OUT" in text


def _report_json(tmp_path, case):
    path = tmp_path / "results.json"
    if case == "not JSON":
        path.write_text('{"top": [1, 2')
    elif case == "no report":
        path.write_text(json.dumps({"format": "sdi-attribute/1", "top": {}}))
    elif case == "broken report":
        path.write_text(json.dumps({"report": {"schema": "sdi-report/1", "queries": []}}))
    return path


REPORT_BAD = [
    ("missing", "no such results file"),
    ("not JSON", "cannot read results JSON"),
    ("no report", "holds no report"),
    ("broken report", "its report data has no 'title'"),
]


@pytest.mark.parametrize("case,message", REPORT_BAD, ids=[c for c, _ in REPORT_BAD])
def test_report_of_a_bad_json_exits_2_and_writes_nothing(tmp_path, capsys, case, message):
    path = _report_json(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no page, no temporary file


def test_report_output_in_a_missing_folder_exits_2(tmp_path, capsys):
    path = _report_json(tmp_path, "no report")
    assert main(["report", str(path), "-o", str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_texts_and_token_labels_of_token_ids(tiny):
    """Pre-tokenised ids: decoded by the tokenizer when there is one, else shown as ids; token
    labels padded to the batch's length, as the explanations' positions are."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"], local_files_only=True)
    texts = _texts(tiny["query"])
    rows = [tokenizer(t)["input_ids"] for t in texts]
    batches = Batches(rows, 3, tokenizer.pad_token_id, "cpu")  # 4 rows: batches of 3 and 1
    assert list(example_texts(batches, tokenizer)) == texts
    assert list(example_texts(batches, None)) == [" ".join(map(str, r)) for r in rows]
    labels = list(example_tokens(batches, tokenizer))
    longest = max(len(r) for r in rows[:3])
    for row, ids in enumerate(rows):
        length = longest if row < 3 else len(ids)
        assert labels[row] == [tokenizer.decode([i]) for i in ids] + [PAD_LABEL] * (
            length - len(ids)
        )
    with_texts = Batches(rows, 3, 0, "cpu", texts=["a", "b", "c", "d"])
    assert list(example_texts(with_texts, tokenizer)) == ["a", "b", "c", "d"]


def test_console_script_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^sdi = "sdi\.cli:console_main"$', text, re.M)


def test_report_numbers_positions_the_tokens_do_not_fit(capsys):
    """Explanations with another position count than the padded batches (a core that adds or
    drops positions): the report numbers the positions and says why, the results are kept."""
    top = make_top(n_query=2, k=2, steps=3, n_train=5, length=4)
    common = dict(tokenizer=None, tracin_se=None, step_labels=None, title="t", progress=False)
    for length, labelled in ((4, True), (5, False)):
        rows = [[1] * length, [2] * (length - 1), [3] * length, [4] * 2, [5] * length]
        batches = Batches(rows, 2, 0, "cpu")  # every batch padded to `length`
        data = attribute_report_data(
            top, train=batches, query=Batches(rows[:2], 2, 0, "cpu"), **common
        )
        tokens = [q["tokens"] for q in data["queries"]] + [
            t["tokens"] for t in data["train"].values()
        ]
        assert all((t is not None) == labelled for t in tokens), length
        err = capsys.readouterr().err
        assert ("the report numbers the positions" in err) != labelled
        assert data["has_explanations"]
