"""Triton sketch kernels vs the plain-torch reference (:mod:`sdi.kernels.torch_ops`).

Runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below unless already set): tiny, odd
shapes, so that every mask and the token split between programs are exercised. With
``TRITON_INTERPRET=0`` on a CUDA machine the same tests run on the GPU.

Every uninitialised allocation made during a test is NaN-poisoned (fixture ``poison_empty``), so
any output or partial-sum element a kernel forgets to write fails the comparison.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sdi import backend  # noqa: E402
from sdi.kernels import torch_ops  # noqa: E402
from sdi.kernels.count_sketch import count_sketch  # noqa: E402
from sdi.kernels.embedding import tensor_sketch_embedding  # noqa: E402
from sdi.kernels.linear import FUSED_MAX_M, default_path, tensor_sketch_linear  # noqa: E402
from sdi.kernels.linear_simple import spectrum_dot  # noqa: E402
from sdi.sketch import (  # noqa: E402
    draw_count_sketch,
    draw_tensor_sketch,
    sketch_matrix_explicit,
)

if os.environ["TRITON_INTERPRET"] == "1":
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _generator(*case) -> torch.Generator:
    """A generator seeded from the test case, so every case draws different data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _randn(gen: torch.Generator, *shape, dtype=F32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max error relative to the largest reference entry (sketch entries can be near zero)."""
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite output"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"max abs error {err:.3e} vs max |ref| {scale:.3e}"


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like / Tensor.new_empty return NaN-filled float tensors."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k))
    )


def _nan_out(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE)


# ---------------------------------------------------------------------------------------------
# CountSketch


@pytest.mark.parametrize(
    "lead, d, m, dtype",
    [
        ((3, 5), 7, 64, F32),
        ((15,), 37, 96, BF16),  # 15 rows and m=96: ragged in both tile dimensions
        ((2, 3), 13, 128, F16),
        ((), 13, 64, F32),  # a single vector
        ((4,), 300, 64, F32),  # d >> m: long bucket lists
        ((2,), 5, 16384, F32),  # the largest m, nearly all buckets empty
    ],
)
def test_count_sketch_matches_torch(lead, d, m, dtype):
    gen = _generator("cs", lead, d, m, dtype)
    table = draw_count_sketch(d, m, gen).to(DEVICE)
    x = _randn(gen, *lead, d, dtype=dtype)
    got = count_sketch(x, table)
    assert got.shape == (*lead, m)
    _assert_close(got, torch_ops.count_sketch(x, table))


def test_count_sketch_out_buffer_and_strided_input():
    gen = _generator("cs-out")
    table = draw_count_sketch(13, 64, gen).to(DEVICE)
    x = _randn(gen, 13, 5).t()  # (5, 13), stride 5 along d
    out = _nan_out(5, 64)
    got = count_sketch(x, table, out=out)
    assert got is out
    _assert_close(out, torch_ops.count_sketch(x, table))


# ---------------------------------------------------------------------------------------------
# TensorSketch of a Linear use


LINEAR_CASES = [
    (3, 5, 7, 13, 64, F32),
    (3, 3, 37, 13, 128, BF16),
    (2, 5, 13, 37, 256, F16),  # first size where the fused DFT runs on tl.dot
]


@pytest.mark.parametrize("path", ["simple", "fused"])
@pytest.mark.parametrize("n_b, n_t, d_in, d_out, m, dtype", LINEAR_CASES)
def test_linear_matches_torch(path, n_b, n_t, d_in, d_out, m, dtype):
    gen = _generator("lin", path, n_b, n_t, d_in, d_out, m, dtype)
    table = draw_tensor_sketch(d_out, d_in, m, gen).to(DEVICE)
    a = _randn(gen, n_b, n_t, d_in, dtype=dtype)
    g = _randn(gen, n_b, n_t, d_out, dtype=dtype)
    out = _nan_out(n_b, m)
    got = tensor_sketch_linear(a, g, table, path=path, out=out)
    assert got is out
    # fused: on a GPU its DFT runs as three TF32 passes, a little below fp32 accuracy
    _assert_close(
        got, torch_ops.tensor_sketch_linear(a, g, table), 1e-4 if path == "fused" else 1e-5
    )


@pytest.mark.parametrize("path", ["simple", "fused"])
def test_linear_equals_explicit_sketch_across_scales(path):
    """Grad-outputs 1e9 times smaller than activations, and one token with an all-zero grad (as
    the last position of a next-token loss): the fused path's packed transform must keep the
    cross term; both paths must equal the sketch of the materialised gradient."""
    gen = _generator("lin-explicit", path)
    n_b, n_t, d_in, d_out, m = 2, 4, 11, 6, 64
    table = draw_tensor_sketch(d_out, d_in, m, gen).to(DEVICE)
    a = _randn(gen, n_b, n_t, d_in, scale=1e3)
    g = _randn(gen, n_b, n_t, d_out, scale=1e-6)
    g[:, -1] = 0.0
    phi = torch.einsum("bti,btj->bij", g.double(), a.double()).float()
    _assert_close(
        tensor_sketch_linear(a, g, table, path=path), sketch_matrix_explicit(phi, table), 1e-4
    )


def test_linear_simple_any_m_and_largest_m():
    for n_b, n_t, d_in, d_out, m in [(3, 3, 13, 7, 96), (1, 2, 5, 7, 16384)]:
        gen = _generator("lin-m", m)
        table = draw_tensor_sketch(d_out, d_in, m, gen).to(DEVICE)
        a = _randn(gen, n_b, n_t, d_in)
        g = _randn(gen, n_b, n_t, d_out, dtype=BF16)
        _assert_close(
            tensor_sketch_linear(a, g, table, path="simple"),
            torch_ops.tensor_sketch_linear(a, g, table),
        )


@pytest.mark.parametrize(
    "n_b, n_t, d_in, d_out, m, dtype",
    [
        (2, 7, 29, 11, 256, BF16),  # 7 tokens: a ragged last token block, and chunks of blocks
        (1, 9, 19, 23, 512, F16),  # m1 != m2 on the tl.dot path, 9 tokens
        (3, 1, 5, 3, 32, F32),  # one token per example, broadcast-and-sum path
    ],
)
def test_linear_fused_token_blocks(n_b, n_t, d_in, d_out, m, dtype):
    """The fused kernel walks tokens in blocks of fused_config(m).BLOCK_T: token counts that are
    not a multiple of it, and chunks that end inside a block, must add exactly the real tokens."""
    gen = _generator("fused-blocks", n_b, n_t, d_in, d_out, m, dtype)
    table = draw_tensor_sketch(d_out, d_in, m, gen).to(DEVICE)
    a = _randn(gen, n_b, n_t, d_in, dtype=dtype)
    g = _randn(gen, n_b, n_t, d_out, dtype=dtype, scale=1e-3)
    out = _nan_out(n_b, m)
    assert tensor_sketch_linear(a, g, table, path="fused", out=out) is out
    _assert_close(out, torch_ops.tensor_sketch_linear(a, g, table), 1e-4)


def test_linear_default_path_follows_the_rule(monkeypatch):
    """path=None takes default_path(m): fused for the powers of two it supports, else simple."""
    from sdi.kernels import linear

    assert default_path(64) == "fused" and default_path(96) == "simple"
    assert default_path(2 * FUSED_MAX_M) == "simple"
    taken = []
    for name in ("linear_fused", "linear_simple"):
        real = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *a, _f=real, _n=name: taken.append(_n) or _f(*a))
    gen = _generator("default-path")
    for m in (64, 96):
        table = draw_tensor_sketch(5, 7, m, gen).to(DEVICE)
        a, g = _randn(gen, 2, 3, 7), _randn(gen, 2, 3, 5)
        _assert_close(
            tensor_sketch_linear(a, g, table), torch_ops.tensor_sketch_linear(a, g, table)
        )
    assert taken == ["linear_fused", "linear_simple"]


@pytest.mark.parametrize("m", [96, 8, 2 * FUSED_MAX_M])
def test_linear_fused_rejects_unsupported_m(m):
    gen = _generator("fused-m", m)
    table = draw_tensor_sketch(3, 5, m, gen).to(DEVICE)
    a, g = _randn(gen, 1, 2, 5), _randn(gen, 1, 2, 3)
    with pytest.raises(ValueError, match="power of two"):
        tensor_sketch_linear(a, g, table, path="fused")


def test_spectrum_dot_split_over_tokens():
    """The partial sums of several token chunks (ragged last chunk, F not a block multiple)."""
    gen = _generator("spec")
    spec_a = _randn(gen, 3, 5, 33, 2)
    spec_g = _randn(gen, 3, 5, 33, 2)
    want = torch.view_as_real(
        (torch.view_as_complex(spec_a) * torch.view_as_complex(spec_g)).sum(1)
    )
    out = _nan_out(3, 33, 2)
    assert spectrum_dot(spec_a, spec_g, out=out) is out
    _assert_close(out, want)


def test_linear_empty_tokens_gives_zeros():
    gen = _generator("empty")
    table = draw_tensor_sketch(3, 5, 64, gen).to(DEVICE)
    a, g = _randn(gen, 2, 0, 5), _randn(gen, 2, 0, 3)
    for path in ("simple", "fused"):
        assert torch.equal(
            tensor_sketch_linear(a, g, table, path=path), torch.zeros(2, 64, device=DEVICE)
        )


# ---------------------------------------------------------------------------------------------
# TensorSketch of an Embedding use


@pytest.mark.parametrize(
    "n_b, n_t, vocab, d, m, dtype",
    [
        (3, 5, 11, 7, 64, F32),
        (3, 3, 50, 37, 128, BF16),
        (2, 4, 20, 13, 96, F16),  # m not a power of two: masked bucket block
        (1, 2, 9, 7, 16384, F32),
    ],
)
def test_embedding_matches_torch(n_b, n_t, vocab, d, m, dtype):
    gen = _generator("emb", n_b, n_t, vocab, d, m, dtype)
    table = draw_tensor_sketch(vocab, d, m, gen).to(DEVICE)
    ids = torch.randint(0, vocab, (n_b, n_t), generator=gen).to(DEVICE)
    g = _randn(gen, n_b, n_t, d, dtype=dtype)
    out = _nan_out(n_b, m)
    assert tensor_sketch_embedding(ids, g, table, out=out) is out
    _assert_close(out, torch_ops.tensor_sketch_embedding(ids, g, table))


# ---------------------------------------------------------------------------------------------
# input validation


def test_clear_errors():
    gen = _generator("errors")
    table = draw_tensor_sketch(3, 5, 64, gen).to(DEVICE)
    a, g = _randn(gen, 2, 4, 5), _randn(gen, 2, 4, 3)
    with pytest.raises(ValueError, match="last dimension"):
        count_sketch(a, table.out)
    with pytest.raises(TypeError, match="not supported"):
        count_sketch(a.double(), table.inp)
    with pytest.raises(ValueError, match="equal B, T"):
        tensor_sketch_linear(a, g[:, :3], table)
    with pytest.raises(ValueError, match="g vs table.out"):
        tensor_sketch_linear(a, a, table)
    with pytest.raises(ValueError, match="path must be"):
        tensor_sketch_linear(a, g, table, path="fast")
    with pytest.raises(ValueError, match="out must be float32"):
        tensor_sketch_linear(a, g, table, out=torch.zeros(2, 63, device=DEVICE))
    with pytest.raises(ValueError, match="hash table is on"):
        count_sketch(a.to("meta"), table.inp)
    mixed = type(table)(out=table.out, inp=draw_count_sketch(5, 128, gen).to(DEVICE))
    with pytest.raises(ValueError, match="disagree on m"):
        tensor_sketch_linear(a, g, mixed)
    emb = draw_tensor_sketch(7, 3, 64, gen).to(DEVICE)
    with pytest.raises(ValueError, match="outside"):
        tensor_sketch_embedding(torch.full((2, 4), 7, device=DEVICE), g, emb)
    with pytest.raises(TypeError, match="integer"):
        tensor_sketch_embedding(torch.zeros(2, 4, device=DEVICE), g, emb)


def test_embedding_unchecked_ids_out_of_range_contribute_nothing():
    gen = _generator("unchecked")
    table = draw_tensor_sketch(11, 5, 64, gen).to(DEVICE)
    ids = torch.randint(0, 11, (3, 6), generator=gen).to(DEVICE)
    g = _randn(gen, 3, 6, 5)
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[0, 1], bad[2, 4], bad[1, 0] = True, True, True
    ids_bad = torch.where(
        bad, torch.tensor([11, -3, 500], device=DEVICE).repeat(6)[: ids.numel()].view_as(ids), ids
    )
    out = torch.full((3, 64), float("nan"), device=DEVICE)
    tensor_sketch_embedding(ids_bad, g, table, out=out, check_ids=False)
    want = torch_ops.tensor_sketch_embedding(ids, g * (~bad).unsqueeze(-1), table)
    _assert_close(out, want)


# ---------------------------------------------------------------------------------------------
# backend wiring


def test_triton_backend_uses_these_kernels():
    be = backend.get_backend("triton")
    assert be.name == "triton"
    assert be.count_sketch is count_sketch
    assert be.tensor_sketch_linear is tensor_sketch_linear
    assert be.tensor_sketch_embedding.func is tensor_sketch_embedding  # without the id sync
    assert be.tensor_sketch_embedding.keywords == {"check_ids": False}
    gen = _generator("backend")
    table = draw_tensor_sketch(6, 9, 64, gen).to(DEVICE)
    a, g = _randn(gen, 2, 3, 9, dtype=BF16), _randn(gen, 2, 3, 6, dtype=BF16)
    ref = backend.get_backend("torch")
    _assert_close(be.tensor_sketch_linear(a, g, table), ref.tensor_sketch_linear(a, g, table))
    _assert_close(be.count_sketch(a, table.inp), ref.count_sketch(a, table.inp))
