"""``einsum`` as a cached plan of one batched matrix product (the GPU port's contraction path).

SPEC: SPEC.md#fast-gpu. The reference writes its contractions as ``np.einsum`` with named
subscripts. On the GPU every call is a kernel launch issued from Python, so the host-side cost of
planning a contraction on each call matters as much as the contraction. ``PlannedEinsum`` plans a
two-operand contraction once per (subscripts, shapes) and then runs it as: sum out the indices
only one operand has, transpose each operand to (batch, kept, contracted), one batched matrix
product (cuBLAS), reshape and transpose to the output's order. Everything else (one operand, three
or more, an index repeated inside one operand, ``...``) goes to the namespace's own ``einsum``.
The result is the same contraction (another summation order: rounding-level differences).
"""

from __future__ import annotations

import math

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # for "...": the reference's subscripts are lower case


class PlannedEinsum:
    """``einsum(subscripts, *operands)`` over the array module ``xp`` with a plan cache."""

    def __init__(self, xp):
        self._xp = xp
        self._plans: dict = {}
        self.calls = 0
        self.fallbacks = 0  # calls sent to xp.einsum (for the profile and the tests)

    def __call__(self, subscripts, *operands, **kwargs):
        self.calls += 1
        kwargs.pop("optimize", None)  # the contraction order is the plan's (left to right)
        if kwargs or len(operands) < 2:
            self.fallbacks += 1
            return self._xp.einsum(subscripts, *operands, **kwargs)
        key = (subscripts,) + tuple(op.shape for op in operands)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(subscripts, [op.shape for op in operands])
            self._plans[key] = plan
        if plan is False:
            self.fallbacks += 1
            return self._xp.einsum(subscripts, *operands)
        result = operands[0]
        for step, b in zip(plan, operands[1:], strict=True):  # left to right, one product per operand
            result = self._run(step, result, b)
        return result

    @staticmethod
    def _expand(subscripts: str, shapes) -> tuple[list[str], str] | None:
        """Explicit subscripts with "..." spelled out (upper-case letters, aligned from the right)."""
        if "->" not in subscripts:
            return None
        ins, out = subscripts.replace(" ", "").split("->")
        parts = ins.split(",")
        if len(parts) != len(shapes):
            return None
        widest = 0
        for idx, shape in zip(parts, shapes, strict=True):
            if "..." in idx:
                widest = max(widest, len(shape) - (len(idx) - 3))
        if widest > len(_LETTERS) or any(c.isupper() for c in subscripts):
            return None
        ell = _LETTERS[:widest]
        expanded = []
        for idx, shape in zip(parts, shapes, strict=True):
            if "..." in idx:
                n = len(shape) - (len(idx) - 3)
                if n < 0:
                    return None
                idx = idx.replace("...", ell[widest - n:])
            if len(idx) != len(shape):
                return None
            expanded.append(idx)
        return expanded, out.replace("...", ell)

    @classmethod
    def _plan(cls, subscripts: str, shapes):
        spelled = cls._expand(subscripts, shapes)
        if spelled is None:
            return False
        parts, out = spelled
        if any(len(set(p)) != len(p) for p in parts) or len(set(out)) != len(out):
            return False  # a diagonal or a repeated output index
        steps = []
        ia, sa = parts[0], tuple(shapes[0])
        for j in range(1, len(parts)):
            ib, sb = parts[j], tuple(shapes[j])
            later = "".join(parts[j + 1:]) + out
            target = out if j == len(parts) - 1 else "".join(
                dict.fromkeys(c for c in ia + ib if c in later))  # what the rest still needs
            step = cls._plan_pair(ia, sa, ib, sb, target)
            if step is False:
                return False
            steps.append(step)
            ia, sa = target, step[-1]
        return steps

    @staticmethod
    def _plan_pair(ia: str, sa: tuple, ib: str, sb: tuple, out: str):
        size_a = dict(zip(ia, sa, strict=True))
        size_b = dict(zip(ib, sb, strict=True))
        if any(c not in size_a and c not in size_b for c in out):
            return False
        batch = [c for c in out if c in ia and c in ib]
        left = [c for c in out if c in ia and c not in ib]
        right = [c for c in out if c in ib and c not in ia]
        contract = [c for c in ia if c in ib and c not in out]
        for c in left + right + contract:  # only batch indices may broadcast (matmul does that)
            if c in size_a and c in size_b and size_a[c] != size_b[c]:
                return False
        for c in batch:
            if size_a[c] != size_b[c] and 1 not in (size_a[c], size_b[c]):
                return False
        a_only = [c for c in ia if c not in ib and c not in out]  # summed before the product
        b_only = [c for c in ib if c not in ia and c not in out]
        a_keep = [c for c in ia if c not in a_only]
        b_keep = [c for c in ib if c not in b_only]
        a_sum = tuple(i for i, c in enumerate(ia) if c in a_only)
        b_sum = tuple(i for i, c in enumerate(ib) if c in b_only)
        a_perm = tuple(a_keep.index(c) for c in batch + left + contract)
        b_perm = tuple(b_keep.index(c) for c in batch + contract + right)
        nl = math.prod(size_a[c] for c in left)
        nr = math.prod(size_b[c] for c in right)
        nc = math.prod(size_a[c] for c in contract)
        a_shape = tuple(size_a[c] for c in batch) + (nl, nc)
        b_shape = tuple(size_b[c] for c in batch) + (nc, nr)
        size = {**size_a, **size_b}
        mid = tuple(max(size_a[c], size_b[c]) for c in batch) + tuple(size[c] for c in left + right)
        produced = batch + left + right
        out_perm = tuple(produced.index(c) for c in out)
        final = tuple(mid[i] for i in out_perm)
        return (a_sum, b_sum, a_perm, b_perm, a_shape, b_shape, mid, out_perm, final)

    def _run(self, step, a, b):
        a_sum, b_sum, a_perm, b_perm, a_shape, b_shape, mid, out_perm, _ = step
        if a_sum:
            a = a.sum(axis=a_sum)
        if b_sum:
            b = b.sum(axis=b_sum)
        a3 = a.transpose(a_perm).reshape(a_shape)  # (batch..., left, contracted)
        b3 = b.transpose(b_perm).reshape(b_shape)  # (batch..., contracted, right)
        y = self._xp.matmul(a3, b3).reshape(mid)  # (batch..., left..., right...)
        return y.transpose(out_perm) if out_perm != tuple(range(len(out_perm))) else y
