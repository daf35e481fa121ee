"""Run ``step-decomposed-influence`` 0.1.1 on the accuracy workload, inside its own virtualenv.

    <reference venv>/bin/python bench/accuracy/accuracy_reference.py WORKLOAD.pt RESULT.pt

Started by ``bench/accuracy/accuracy.py``, never by hand: both packages are imported as ``sdi``, so the
reference runs in a separate interpreter. ``WORKLOAD.pt`` (plain tensors, dicts and numbers) holds
the model config and the state of every model variant, the train and query tokens, the sketch
sizes and the seeds. ``RESULT.pt`` gets, per variant, the projected ``sdi`` stacked as
``(n_sizes, n_seeds, N_train, N_query, steps)`` and ``tracin`` as ``(n_sizes, n_seeds, N_train,
N_query)``, and the reference's exact ``exact_sdi``. The looped transformer is this repository's
``sdi/toy.py``, loaded by file path (it needs only torch).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_toy():
    spec = importlib.util.spec_from_file_location("looped_toy", ROOT / "sdi" / "toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    workload_path, result_path = sys.argv[1:3]
    import sdi

    # (The reference venv may live inside this repository, so compare with our package folder.)
    if Path(sdi.__file__).resolve().parent == ROOT / "sdi":
        raise SystemExit(f"imported this repository's sdi ({sdi.__file__}), not the reference")
    from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI

    work = torch.load(workload_path, weights_only=True)
    torch.set_num_threads(int(work["threads"]))
    toy = load_toy()
    model = toy.LoopedTransformer(**work["config"]).eval()
    bs = int(work["batch_size"])
    train = [{"tokens": t} for t in work["train"].split(bs)]
    query = [{"tokens": t} for t in work["query"].split(bs)]
    result = {"sdi": {}, "tracin": {}, "exact_sdi": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in work["states"].items():
            path = Path(tmp) / f"{name}.pt"
            torch.save({"model_state_dict": state}, path)
            common = dict(
                checkpoints=[CheckpointSpec(str(path), weight=1.0)],
                train_loader=train,
                query_loader=query,
                loss_fn=toy.next_token_loss,
                mode="sdi",
            )
            exact = FullGradientTracInSDI(model=model, target_modules=model.core)
            result["exact_sdi"][name] = exact.influence_across_checkpoints(**common).sdi
            exact.close()
            sdi_rows, tracin_rows = [], []
            for m in work["sizes"]:
                sdi_seeds, tracin_seeds = [], []
                for seed in work["seeds"]:
                    est = ProjectedTracInSDI(
                        model=model, target_modules=model.core, projection_size=m, seed=seed
                    )
                    out = est.influence_across_checkpoints(**common)
                    est.close()
                    sdi_seeds.append(out.sdi)
                    tracin_seeds.append(out.tracin)
                sdi_rows.append(torch.stack(sdi_seeds))
                tracin_rows.append(torch.stack(tracin_seeds))
            result["sdi"][name] = torch.stack(sdi_rows)
            result["tracin"][name] = torch.stack(tracin_rows)
    torch.save(result, result_path)


if __name__ == "__main__":
    main()
