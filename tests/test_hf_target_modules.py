"""The README's "Models from transformers" table: each `target_modules` it names is accepted and
gives the step count it states (small configs, random weights, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from sdi import ProjectedTracInSDI

VOCAB, SEQ = 30, 6


def _steps(model, target_modules) -> int:
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        logits = (
            m(input_ids=batch).logits if isinstance(m, transformers.PreTrainedModel) else m(batch)
        )
        return F.cross_entropy(logits.transpose(1, 2), batch, reduction="none").mean(dim=1)

    est = ProjectedTracInSDI(model=model.eval(), target_modules=target_modules, projection_size=16)
    try:
        features = est.featurize_loader(loader=[tokens], loss_fn=loss_fn)
    finally:
        est.close()
    shapes = {tuple(v.shape[:2]) for v in features.phi.values()}
    assert len(shapes) == 1, shapes
    return shapes.pop()[1]


@pytest.mark.parametrize(("layers", "groups"), [(4, 1), (6, 2)])
def test_albert_layer_group(layers, groups):
    config = transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=layers,
        num_hidden_groups=groups,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(config)
    assert _steps(model, model.albert.encoder.albert_layer_groups[groups - 1]) == layers // groups


def test_hrm_text_stacks():
    config = transformers.HrmTextConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        num_layers_per_stack=1,
        H_cycles=2,
        L_cycles=3,
        L_bp_cycles=[2],
    )
    torch.manual_seed(0)
    model = transformers.HrmTextForCausalLM(config)
    padded = model.model.L_bp_cycles_padded  # [1, 2]: the L iterations that keep gradients
    assert _steps(model, model.model.L_module) == sum(padded) == 3
    assert _steps(model, model.model.H_module) == config.H_cycles


class _Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class _MultiLayerLoop(nn.Module):
    """Two layers applied in turn, the pair looped ``passes`` times."""

    def __init__(self, passes: int, d: int = 8):
        super().__init__()
        self.passes = passes
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList([_Layer(d), _Layer(d)])
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for _ in range(self.passes):
            for layer in self.layers:
                x = layer(x)
        return self.head(x)


def test_multi_layer_loop_as_list_or_module_list():
    torch.manual_seed(0)
    model = _MultiLayerLoop(passes=3)
    assert _steps(model, list(model.layers)) == 3
    assert _steps(model, model.layers) == 3
