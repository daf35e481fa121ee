"""Rules by operation: the per-example gradients of one captured use (:class:`sdi.capture.OpUse`).

==========================================  ===================================================
operation                                   exact gradient / projected sketch
==========================================  ===================================================
``F.linear(x, w, b)``, ``x @ w``: ``w`` a   ``G^T A`` written into the block's rows and columns
block of a parameter (``w``, ``bank[i]``,   / TensorSketch with the block's rows of the table
``w.t()``, casts of them)                   (FFT, explicit GEMM on CPU, Triton), bias ``sum g``
``einsum`` / ``@`` / ``bmm`` linear in a      one ``einsum(x, g -> b w)`` (every group's
parameter of 3+ dims (per-head weights)     ``G^T A``) / sketch of it
``F.embedding(ids, w)``                     ``sum onehot(id) (x) g`` / signed shift
``x * s``, ``x + s`` (``s`` broadcast)      ``g x`` / ``g`` summed over the broadcast dims
a call of a module served by a module-level its :class:`~sdi.rules.registry.ModuleRule`
rule (Opacus-covered, registered, generic)
anything else                               vjp of that one operation per example (``vmap``
                                            over the batch, a loop where ``vmap`` fails)
==========================================  ===================================================

A gradient w.r.t. a parameter-derived operand maps back onto the parameters by
:meth:`sdi.derived.Derived.backprop`. Every path is linear in the grad-output, and a parameter's
table is drawn once from its shape (1-D: CountSketch; more dims: TensorSketch of the parameter as
``(prod(shape[:-1]), shape[-1])``), so the sketch does not depend on which path saw a use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import Batched, Operand, OpUse
from ..sketch import CountSketchHash, TensorSketchHash
from .linear import tokens
from .registry import Use

SCALE_GRAD_BY_FREQ = (
    "scale_grad_by_freq=True scales each row's gradient by the token counts of the whole batch, "
    "so one example's gradient depends on the others: it has no per-example gradient"
)

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_BMM = {torch.bmm, torch.Tensor.bmm}
_EMBEDDING = {F.embedding}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
# The broadcast rule's reused product buffer is kept up to this size (one activation tensor).
_SCRATCH_MAX_BYTES = 64 << 20
_MAX_PLANS = 1024


def _batch_first(x: Batched) -> torch.Tensor:
    return x.tensor.movedim(x.dim, 0) if x.dim else x.tensor


def _dense(use, operand: Operand, grad, params, out: dict) -> None:
    """Map ``grad`` (B, *operand) back onto the wanted params, adding into ``out``."""
    counted = set(use.params)
    for p, gp in operand.derived.backprop(grad, [p for p in params if p in counted]).items():
        out[p] = out[p] + gp if p in out else gp


class Scratch:
    """Buffers for temporaries that die within a rule, reused across uses (a fresh one per use
    faults in new pages every time); fresh past ``_SCRATCH_MAX_BYTES``. One flat buffer per dtype
    and device; its views by shape are kept until it grows."""

    def __init__(self):
        self._kept: dict = {}  # (dtype, device) -> a flat buffer; (shape, dtype, device) -> a view

    def get(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape``, its contents undefined, valid until the next ``get``."""
        view = self._kept.get((shape, dtype, device))
        if view is not None:
            return view
        n = math.prod(shape)
        if n * dtype.itemsize > _SCRATCH_MAX_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._kept.get((dtype, device))
        if buffer is None or buffer.numel() < n:  # a new buffer: the old one's views go
            self._kept = {k: v for k, v in self._kept.items() if k[-2:] != (dtype, device)}
            buffer = self._kept[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
        view = self._kept[(shape, dtype, device)] = buffer[:n].view(shape)
        return view


class OpRules:
    """Dispatch a use to its operation's rule; exact gradients or sketches (``rules``)."""

    def __init__(self, rules_of):
        self._rules_of = rules_of  # () -> the featuriser's SketchRules or ExactRules, as shown now
        self._sums = None
        self._scratch = Scratch()
        self._plans: dict = {}  # shapes -> the broadcast rule's shape analysis

    @property
    def rules(self):
        return self._rules_of()

    def features(self, use: OpUse, g: torch.Tensor, sums=None) -> dict:
        """``{param: (B, width)}`` fp32 for this use; ``g`` is the grad-output, batch first.

        With ``sums`` (:class:`~sdi.rules.modes.StepSums`, projected only), the use is added to
        the pass's sums instead, hashed once per pass where that is cheaper; returns ``{}``.
        """
        self._sums = sums
        out = self._features(use, g)
        return {p: f for p, f in out.items() if f is not None}

    def _features(self, use: OpUse, g: torch.Tensor) -> dict:
        if use.module is not None:
            return self._module(use, g)
        if use.func in _LINEAR or use.func in _MATMUL or use.func is torch.einsum:
            done = self._linear(use, g)
            if done is not None:
                return done
        if use.func in _EMBEDDING:
            done = self._embedding(use, g)
            if done is not None:
                return done
        grads = None
        if use.func in _MUL or use.func in _ADD:
            done = self._broadcast(use, g)
            if done is not None:
                return done
        elif use.func is torch.einsum or use.func in _MATMUL or use.func in _BMM:
            grads = _contraction(use, g)
        if grads is None:
            grads = op_vjp(use, g)
        return {p: self.finish(p, gp) for p, gp in grads.items()}

    def _module(self, use: OpUse, g: torch.Tensor) -> dict:
        """A call of a module served by its module-level rule (:class:`ModuleRule`)."""
        module, params, rules = use.module, list(use.params), self.rules
        rule = rules.rule_of(module)
        acts = [_batch_first(x) if isinstance(x, Batched) else x for x in use.args]
        view = Use([a for a in acts if torch.is_tensor(a)], g, use)
        if self._sums is not None:
            rule.add_step(self._sums, module, params, view)
            return {}
        if rules.exact:
            return dict(zip(params, rule.grads(module, params, view), strict=True))
        return dict(zip(params, rule.sketch(rules, module, params, view), strict=True))

    def finish(self, p, grad: torch.Tensor) -> torch.Tensor:
        """A dense per-example gradient ``(B, *p.shape)`` as this mode's feature."""
        if self._sums is not None:  # (projected only)
            self._sums.add_grad(p, grad.reshape(grad.shape[0], -1).float())
            return None
        if self.rules.exact:
            return grad.reshape(grad.shape[0], -1).float()
        return self.rules.sketch_flat(p, grad)

    def _linear(self, use: OpUse, g: torch.Tensor):
        if use.func is torch.einsum:
            x, w, transposed = _einsum_linear(use)
            bias = None
        else:
            x, w = use.args[0], use.args[1]
            bias = use.args[2] if len(use.args) > 2 else use.kwargs.get("bias")
            transposed = use.func in _MATMUL  # x @ w is linear(x, w.t())
            if not isinstance(x, Batched):  # w @ x: the vjp
                return None
            if transposed and (x.tensor.dim() < 2 or bias is not None or use.kwargs):
                return None
        if not isinstance(x, Batched) or not isinstance(w, Operand) or len(w.shape) != 2:
            return None
        a, gt = tokens(_batch_first(x)), tokens(g)
        out: dict = {}
        view = w.derived.block
        if view is not None and any(p is view.param for p in use.params):
            out[view.param] = self._linear_block(view, a, gt, view.transposed != transposed)
            wanted = []  # a block is of one parameter
        else:
            counted = set(use.params)
            wanted = [p for p in w.derived.params if p in counted]
        if wanted:
            phi = torch.einsum("bto,bti->boi", gt.float(), a.float())
            dense: dict = {}
            _dense(use, w, phi.transpose(1, 2) if transposed else phi, wanted, dense)
            out.update({p: self.finish(p, gp) for p, gp in dense.items()})
        if isinstance(bias, Operand):
            for p, f in self._onto_params(use, bias, gt.sum(dim=1).float()).items():
                out[p] = out[p] + f if out.get(p) is not None and f is not None else f
        return out

    def _linear_block(self, view, a, g, flip: bool) -> torch.Tensor:
        """``phi = G^T A`` of a block (``flip``: the block is ``A^T G``), as this mode's feature."""
        p, rules = view.param, self.rules
        if flip:
            a, g = g, a
        B = a.shape[0]
        if rules.exact:
            rows = p.numel() // p.shape[-1]
            full = torch.zeros(B, rows, p.shape[-1], device=a.device)
            full[:, view.r0 : view.r1, view.c0 : view.c1] = torch.einsum(
                "bto,bti->boi", g.float(), a.float()
            )
            return full.reshape(B, -1)
        table = rules.tables[p]
        if view.whole and rules.prefers_explicit(p, a.shape[1], a.device, B):
            if self._sums is not None:
                self._sums.add_linear(p, a, g)
                return None
            return rules.sketch_dense(p, rules.weight_grads(p, a, g))
        if not view.whole:
            table = TensorSketchHash(
                _rows(table.out, view.r0, view.r1), _rows(table.inp, view.c0, view.c1)
            )
        return self._sketched(p, rules.backend.tensor_sketch_linear(a, g, table))

    def _sketched(self, p, sketch: torch.Tensor) -> torch.Tensor | None:
        if self._sums is None:
            return sketch
        self._sums.add_sketch(p, sketch)
        return None

    def _embedding(self, use: OpUse, g: torch.Tensor):
        found = _embedding_inputs(use, g)
        if found is None:
            return None
        p, idx, gt = found
        if self.rules.exact:
            B, V = idx.shape[0], p.shape[0]
            rows = idx + V * torch.arange(B, device=idx.device).unsqueeze(1)
            dense = torch.zeros(B * V, gt.shape[-1], device=gt.device)
            dense.index_add_(0, rows.reshape(-1), gt.reshape(-1, gt.shape[-1]).float())
            return {p: dense.reshape(B, -1)}
        table = self.rules.tables[p]
        return {p: self._sketched(p, self.rules.backend.tensor_sketch_embedding(idx, gt, table))}

    def _broadcast(self, use: OpUse, g: torch.Tensor):
        """``x * s`` / ``x + s``: the gradient w.r.t. ``s`` is ``g x`` / ``g`` summed over the dims
        ``s`` is broadcast along -- unless ``s`` spans the batch dimension itself. The shape
        analysis is kept per shapes (:func:`_broadcast_plan`): a looped block repeats the same
        few uses at every step and batch."""
        if len(use.args) != 2 or use.kwargs:
            return None
        s, x = use.args
        if isinstance(x, Operand):
            s, x = x, s
        if not isinstance(s, Operand) or not isinstance(x, Batched):
            return None
        mul = use.func in _MUL
        key = (mul, s.shape, x.dim, x.tensor.shape, use.out_dim, g.shape)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > _MAX_PLANS:  # shapes that vary by batch
                self._plans.clear()
            plan = self._plans[key] = _broadcast_plan(*key)
        if plan is False:
            return None
        dims, summed = plan
        prod = g
        if mul:
            xt = x.tensor.movedim(x.dim, 0) if x.dim else x.tensor
            # a product summed at once is a temporary: into a reused buffer
            dtype = torch.result_type(g, xt)
            prod = torch.mul(
                g, xt, out=self._scratch.get(g.shape, dtype, g.device) if summed else None
            )
        reduced = prod.sum(dim=dims, keepdim=True) if dims else prod
        return self._onto_params(use, s, reduced.reshape(g.shape[0], *s.shape))

    def _onto_params(self, use: OpUse, operand: Operand, grad: torch.Tensor) -> dict:
        """``grad (B, *operand's shape)`` mapped back onto the use's parameters, as this mode's
        features (a cast or reshape of one parameter, the common case, needs no mapping)."""
        derived, params = operand.derived, use.params
        p = derived.params[0]
        if derived.combine is None and any(p is q for q in params):
            if derived.plain:
                return {p: self.finish(p, grad)}
            sources = derived.element_sources() if self._sums is not None else None
            if sources is not None:  # picked elements: added where they came from, no copy
                self._sums.add_grad(p, grad, sources)
                return {}
        dense: dict = {}
        _dense(use, operand, grad, params, dense)
        return {p: self.finish(p, gp) for p, gp in dense.items()}


def _einsum_linear(use: OpUse):
    """``(x, w, transposed)`` when ``use`` is ``einsum("...i,oi->...o", x, w)`` (``transposed``:
    ``"...i,io->...o"``), the batch of ``x`` among its leading letters; else ``(None, None, _)``."""
    args = use.args[1:] if len(use.args) == 3 else tuple(use.args[1]) if len(use.args) == 2 else ()
    if len(args) != 2 or not isinstance(use.args[0], str) or use.kwargs:
        return None, None, False
    spec = use.args[0].replace(" ", "")
    if "->" not in spec or "." in spec:
        return None, None, False
    ins, out = spec.split("->")
    subs = ins.split(",")
    if len(subs) != 2:
        return None, None, False
    if isinstance(args[0], Operand):  # w first: swap to (x, w)
        args, subs = args[::-1], subs[::-1]
    xs, ws = subs
    if len(ws) != 2 or not xs or xs[:-1] != out[:-1] or len(set(xs)) != len(xs):
        return None, None, False
    contracted, produced = xs[-1], out[-1]
    if contracted in out or produced in xs:
        return None, None, False
    if ws == produced + contracted:
        return args[0], args[1], False
    if ws == contracted + produced:
        return args[0], args[1], True
    return None, None, False


def _embedding_inputs(use: OpUse, g: torch.Tensor):
    """``(table, ids (B, T), grad-outputs (B, T, d))`` of ``F.embedding(ids, w)`` with ``w`` a whole
    parameter (padding rows' grads zeroed, as torch gives them none); ``None`` for other forms
    (``max_norm``: the vjp); ``scale_grad_by_freq`` is refused."""
    ids, w = use.args[0], use.args[1]
    if not isinstance(ids, Batched) or not isinstance(w, Operand):
        return None
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    extra = dict(zip(names, use.args[2:], strict=False))
    extra.update(use.kwargs)
    if extra.get("scale_grad_by_freq"):
        raise NotImplementedError(SCALE_GRAD_BY_FREQ)
    if extra.get("max_norm") is not None:
        return None
    view = w.derived.block
    if view is None or not view.whole or use.params != (view.param,):
        return None
    idx = _batch_first(ids)
    idx = idx.reshape(idx.shape[0], -1).long()
    gt = tokens(g)
    pad = extra.get("padding_idx")
    if pad is not None:
        gt = gt * (idx != pad % view.param.shape[0]).unsqueeze(-1).to(gt.dtype)
    return view.param, idx, gt


def _contraction(use: OpUse, g: torch.Tensor) -> dict | None:
    """``einsum(spec, x, w)``, ``x @ w`` / ``bmm`` with ``w`` of 3 or more dims (per-head weights
    ``"bhti,hio->bhto"``, grouped products): the per-example gradient w.r.t. ``w`` is one
    ``einsum(x, g -> b w)`` -- the batched ``G^T A`` of every group at once, then mapped back onto
    the parameters. ``None`` where the use is not of that form (the batch contracted, a repeated
    letter, a broadcast ``w``, more operands): the operation's vjp then."""
    spec = _contraction_spec(use)
    if spec is None:
        return None
    (xs, ws, out), x, w = spec
    batch = xs[x.dim]
    if batch not in out or batch in ws or len(set(ws)) != len(ws) or len(set(xs)) != len(xs):
        return None
    if any(c not in xs and c not in out for c in ws):
        return None  # a letter of w summed over alone: not a product with the activations
    out_first = out[use.out_dim] + out[: use.out_dim] + out[use.out_dim + 1 :]  # g is batch first
    grad = torch.einsum(f"{xs},{out_first}->{batch}{ws}", x.tensor.float(), g.float())
    dense: dict = {}
    _dense(use, w, grad, use.params, dense)
    return dense


def _contraction_spec(use: OpUse):
    """``((x letters, w letters, output letters), x, w)`` of an einsum of one per-example operand
    and one parameter-derived operand, or of ``x @ w`` / ``bmm(x, w)`` with ``w`` 3-D or more."""
    if use.kwargs:
        return None
    if use.func is torch.einsum:
        args = (
            use.args[1:] if len(use.args) == 3 else tuple(use.args[1]) if len(use.args) == 2 else ()
        )
        if len(args) != 2 or not isinstance(use.args[0], str):
            return None
        text = use.args[0].replace(" ", "")
        if "->" not in text or "." in text or len(text.split("->")[0].split(",")) != 2:
            return None
        ins, out = text.split("->")
        subs = ins.split(",")
    else:
        args = use.args
        if len(args) != 2 or not all(isinstance(a, (Batched, Operand)) for a in args):
            return None
        shapes = [a.tensor.shape if isinstance(a, Batched) else a.shape for a in args]
        weight = shapes[0] if isinstance(args[0], Operand) else shapes[1]
        if min(len(shapes[0]), len(shapes[1])) < 2 or len(weight) < 3:
            return None  # a 2-D weight is the Linear rule's (or, declined there, the vjp's)
        letters = "abcdefghijklmnopqrstuvw"
        n = max(len(shapes[0]), len(shapes[1]))
        lead = letters[: n - 2]
        a, b = lead[n - len(shapes[0]) :], lead[n - len(shapes[1]) :]
        if any(shapes[0][i] != shapes[1][j] for i, j in _shared(a, b)):
            return None  # a size-1 dimension broadcast against the other operand
        subs, out = [a + "xy", b + "yz"], lead + "xz"
    (xs, ws), (x, w) = subs, args
    if isinstance(x, Operand):
        (xs, ws), (x, w) = (ws, xs), (w, x)
    if not isinstance(x, Batched) or not isinstance(w, Operand) or len(w.shape) < 2:
        return None
    if len(ws) != len(w.shape) or len(xs) != x.tensor.dim():
        return None
    return (xs, ws, out), x, w


def _shared(a: str, b: str) -> list[tuple[int, int]]:
    """Index pairs of the letters two operands' leading dims share."""
    return [(a.index(c), b.index(c)) for c in a if c in b]


def _broadcast_plan(mul: bool, s_shape, x_dim: int, x_shape, out_dim: int, g_shape):
    """``(dims to sum, whether the product is a summed temporary)`` of :meth:`OpRules._broadcast`
    for these shapes; ``False`` where the rule does not apply (``s`` spans the batch, or ``x`` is
    not laid out like the output)."""
    nd = len(g_shape)
    shape = (1,) * (nd - len(s_shape)) + tuple(s_shape)
    if len(s_shape) > nd or shape[out_dim] != 1:
        return False
    rest = shape[:out_dim] + shape[out_dim + 1 :]
    summed = False
    if mul:
        if len(x_shape) != nd or x_dim != out_dim:
            return False
        moved = (x_shape[x_dim], *x_shape[:x_dim], *x_shape[x_dim + 1 :])
        summed = moved == tuple(g_shape) and any(
            n == 1 and k != 1 for n, k in zip(rest, g_shape[1:], strict=True)
        )
    # the product has g's shape: g is the gradient of the output, which x * s broadcasts to
    dims = [i + 1 for i, n in enumerate(rest) if n == 1 and g_shape[i + 1] != 1]
    return dims, summed


def _rows(table: CountSketchHash, start: int, stop: int) -> CountSketchHash:
    return CountSketchHash(table.h[start:stop], table.s[start:stop], table.m)


def op_vjp(use: OpUse, g: torch.Tensor) -> dict:
    """The exact per-example gradients ``(B, *p.shape)`` of ``use.params`` through this one
    operation: ``vmap`` over the batch of ``vjp`` (each example a batch of one); a per-example
    loop when ``vmap`` cannot follow the operation."""
    leaves, spec = tree_flatten((use.args, use.kwargs))
    batched = [i for i, x in enumerate(leaves) if isinstance(x, Batched)]
    B = g.shape[0]
    rows, dims = [], []
    for i in batched:
        x = leaves[i]
        if x.tensor.shape[x.dim] == B:
            rows.append(x.tensor)
            dims.append(x.dim)
        else:  # size 1: broadcast to every example
            leaves[i] = x.tensor
    batched = [i for i in batched if isinstance(leaves[i], Batched)]
    params = list(use.params)
    operands = {i: x.derived for i, x in enumerate(leaves) if isinstance(x, Operand)}
    every = {p for d in operands.values() for p in d.params}
    fixed = {p: p.detach() for p in every if p not in set(params)}

    def run(values, ex_rows):
        vals = {**fixed, **dict(zip(params, values, strict=True))}
        filled = list(leaves)
        for i, d in operands.items():
            filled[i] = d.value(vals)
        for i, r, d in zip(batched, ex_rows, dims, strict=True):
            filled[i] = r.unsqueeze(d)
        args, kwargs = tree_unflatten(filled, spec)
        out = use.func(*args, **kwargs)
        return next(o for o in tree_flatten(out)[0] if torch.is_tensor(o))

    primals = tuple(p.detach() for p in params)
    cot = g.movedim(0, use.out_dim)

    def one(ex_rows, g_i):
        out, pull = vjp(lambda *v: run(v, ex_rows), *primals)
        return pull(g_i.unsqueeze(use.out_dim).to(out.dtype))

    try:
        with torch.enable_grad():
            grads = vmap(one, in_dims=(dims, use.out_dim))(rows, cot)
    except Exception:  # data-dependent shapes and the like: one example at a time
        per = [
            one(
                [r.select(d, b) for r, d in zip(rows, dims, strict=True)],
                cot.select(use.out_dim, b),
            )
            for b in range(B)
        ]
        grads = [torch.stack([q[k] for q in per]) for k in range(len(params))]
    return {p: gp.float() for p, gp in zip(params, grads, strict=True)}
