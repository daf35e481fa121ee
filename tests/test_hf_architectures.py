"""Layers of many `transformers` architectures, attributed exactly (issue 18: real models).

Each model is built from a small config with random weights (no download), one decoder layer is
selected, and exact TracIn features of a padded batch equal per-example autograd (float32: the MoE
kernels of `transformers` need it). The layers compute with their weights in every way issue 18
names: `nn.Linear`, functional kernels (Mamba's convolution and scan, LFM2's short convolution),
MoE experts in 3-D banks over flattened tokens (Mixtral, GraniteMoE), GPT-2's ``Conv1D`` (an
``addmm`` over flattened tokens), fused or grouped projections, rotary tables, RMS norms with their
own forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers  # a test dependency: the `hf` extra
from looped_lm import per_example_grads

from sdi.featurize import Featurizer

V = 61
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "gemma2": ("Gemma2Config", dict(head_dim=8)),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "mamba": ("MambaConfig", dict(state_size=4, expand=2, conv_kernel=3)),
    "lfm2": ("Lfm2Config", {}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),  # Conv1D: addmm
}


def _loss(model, batch):
    """Per-example mean next-token cross entropy over the unpadded positions ``(B,)``."""
    logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1]
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none")
    kept = batch["mask"][:, 1:].float()
    return (per_token * kept).sum(1) / kept.sum(1)


def _layers(model):
    for path in ("model.layers", "backbone.layers", "gpt_neox.layers", "transformer.h"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return obj
        except AttributeError:
            continue
    raise AssertionError(f"no layer stack found in {type(model).__name__}")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_layer_of_each_architecture_equals_per_example_autograd(arch):
    name, extra = CONFIGS[arch]
    torch.manual_seed(0)
    base = {"vocab_size": V} if arch == "gpt2" else COMMON
    config = getattr(transformers, name)(**{**base, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, V, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 6:] = 0
    batch = {"ids": ids, "mask": mask}
    layer = _layers(model)[1]
    f = Featurizer(model=model, target_modules=layer, projection_size=None)
    try:
        got, _ = f.compute_batch(batch, _loss, sum_steps=True)
    finally:
        f.close()
    params = [p for p in layer.parameters() if p.requires_grad]
    want = per_example_grads(model, params, _loss, [batch]).double()
    rel = float((got.double() - want).norm() / want.norm())
    assert want.norm() > 0 and rel < 1e-5, rel
