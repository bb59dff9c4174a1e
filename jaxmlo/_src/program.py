"""The dataflow graph of a multi-level program: problems plus u2l / l2u edges.

Two edge sets (thesis section 2.3.1, Figure 2.2):

* upper-to-lower (``u2l``): ``{upper: [lower, ...]}`` -- the upper problem's current
  parameters enter the lower problem's loss;
* lower-to-upper (``l2u``): ``{lower: [upper, ...]}`` -- the lower problem's (approximately)
  optimal parameters enter the upper problem's loss.

Every path from an upper problem's parameters ``theta_k`` to a lower solution
``theta_l*`` starts with one u2l edge and continues along l2u edges (thesis eq. 2.2).

References:
  S. K. Choe, *Understanding Training Data in Large-Scale Machine Learning*, CMU 2024,
  sections 2.2-2.4.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import jax
import optax

from jaxmlo._src.problem import Problem

__all__ = ["Program"]


def _as_edges(edges, kind):
    """Normalises ``{a: [b, ...]}`` (or ``{a: b}``) to a sorted tuple of ``(a, b)`` pairs."""
    if edges is None:
        return ()
    if not isinstance(edges, Mapping):
        raise TypeError(f"{kind} must be a dict {{name: [name, ...]}}, got {type(edges).__name__}")
    out = []
    for a, bs in edges.items():
        if isinstance(bs, str):
            bs = [bs]
        for b in bs:
            if not isinstance(a, str) or not isinstance(b, str):
                raise TypeError(f"{kind} edge {a!r} -> {b!r}: problem names must be strings")
            out.append((a, b))
    if len(set(out)) != len(out):
        dup = sorted({e for e in out if out.count(e) > 1})
        raise ValueError(f"{kind} has duplicate edges {dup}")
    return tuple(out)


class Program:
    """An immutable, validated multi-level program (a DAG of :class:`Problem`).

    Args:
      problems: the problems (names unique).
      u2l: upper-to-lower edges ``{upper: [lower, ...]}``.
      l2u: lower-to-upper edges ``{lower: [upper, ...]}``.
      total_derivative: how a problem's hypergradient combines the best responses below it.
        ``"exact"`` (default): the total derivative of its loss. Where eq. 2.2 is exact (no
        problem below it is the upper problem of another, the usual bilevel and chain
        programs) this is eq. 2.2 with each problem's method; on a nested sub-program it is
        implicit differentiation of the sub-program's stationarity conditions (dense solves,
        see ``jaxmlo._src.nested``), exact at the lower problems' optima whatever their
        methods. ``"paths"``: thesis eq. 2.2 everywhere, each best response from its
        problem's own loss with the other values held fixed (Betty's rule; on nested
        programs it is not the total derivative, but it keeps first-order methods
        first-order).

    Raises:
      ValueError: naming the problems involved, on a duplicate or unknown name, a self-edge,
        a cycle, a problem no edge connects to the rest, a u2l edge with no l2u path back
        into the upper problem's loss, a lower problem without a
        hypergradient method, or (when ``Problem.example_batch`` is given) a loss that asks
        for a dependency the graph does not give.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmlo import Problem, sama
      >>> def inner_loss(w, deps, batch):  # w is pulled towards the outer parameters
      ...     return jnp.sum((w - deps["outer"]) ** 2)
      >>> def outer_loss(theta, deps, batch):  # evaluated at inner's solution
      ...     return jnp.sum((deps["inner"] - 1.0) ** 2)
      >>> inner = Problem("inner", inner_loss, jnp.zeros(2), optax.sgd(0.1), method=sama())
      >>> outer = Problem("outer", outer_loss, jnp.zeros(2), optax.adam(0.1))
      >>> prog = Program([outer, inner], u2l={"outer": ["inner"]}, l2u={"inner": ["outer"]})
      >>> prog.order  # lowest first
      ('inner', 'outer')
    """

    __slots__ = (
        "_problems",
        "_u2l",
        "_l2u",
        "_order",
        "_deps",
        "_lowers",
        "_uppers",
        "_total_derivative",
    )

    def __init__(
        self,
        problems: Sequence[Problem],
        u2l=None,
        l2u=None,
        *,
        total_derivative: str = "exact",
    ):
        if total_derivative not in ("exact", "paths"):
            raise ValueError(
                f"total_derivative must be 'exact' or 'paths', got {total_derivative!r}"
            )
        # optax.MultiSteps (gradient accumulation) is a wrapper object, not itself a
        # GradientTransformation; use its transformation so every method sees one interface.
        problems = tuple(
            p._replace(optimizer=p.optimizer.gradient_transformation())
            if isinstance(p, Problem) and isinstance(p.optimizer, optax.MultiSteps)
            else p
            for p in problems
        )
        if not problems:
            raise ValueError("Program needs at least one problem")
        for p in problems:
            if not isinstance(p, Problem):
                raise TypeError(f"Program problems must be jaxmlo.Problem, got {type(p).__name__}")
            if not isinstance(p.optimizer, optax.GradientTransformation):
                raise TypeError(
                    f"problem {p.name!r}: optimizer must be an optax.GradientTransformation, "
                    f"got {type(p.optimizer).__name__}"
                )
            if not isinstance(p.unroll_steps, int) or p.unroll_steps < 1:
                raise ValueError(
                    f"problem {p.name!r}: unroll_steps must be an int >= 1, got {p.unroll_steps!r}"
                )
        names = [p.name for p in problems]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate problem names {dup}")
        by_name = {p.name: p for p in problems}
        u2l_e, l2u_e = _as_edges(u2l, "u2l"), _as_edges(l2u, "l2u")

        for kind, edges in (("u2l", u2l_e), ("l2u", l2u_e)):
            for a, b in edges:
                unknown = [n for n in (a, b) if n not in by_name]
                if unknown:
                    raise ValueError(
                        f"{kind} edge {a!r} -> {b!r} names unknown problem(s) {unknown}; "
                        f"known problems: {sorted(by_name)}"
                    )
                if a == b:
                    raise ValueError(
                        f"{kind} self-edge on problem {a!r}: a problem cannot depend on itself"
                    )

        # "lower -> upper" ordering graph: u2l (u, l) and l2u (l, u) both mean l is below u.
        above = {n: set() for n in names}  # n -> problems directly above n
        for u, l in u2l_e:
            above[l].add(u)
        for l, u in l2u_e:
            above[l].add(u)
        order = _toposort(names, above)

        # Connectivity: with more than one problem, every problem must touch an edge path to
        # the others; an isolated problem would silently never interact with the program.
        if len(names) > 1:
            adj = {n: set() for n in names}
            for a, b in u2l_e + l2u_e:
                adj[a].add(b)
                adj[b].add(a)
            seen, stack = {names[0]}, [names[0]]
            while stack:
                for m in adj[stack.pop()]:
                    if m not in seen:
                        seen.add(m)
                        stack.append(m)
            lost = [n for n in names if n not in seen]
            if lost:
                raise ValueError(
                    f"problem(s) {lost} are unreachable: no u2l/l2u edge connects them to "
                    f"{sorted(seen)}"
                )

        deps = {
            n: tuple(sorted({u for u, l in u2l_e if l == n} | {l for l, u in l2u_e if u == n}))
            for n in names
        }
        lowers = {n: tuple(sorted(l for l, u in l2u_e if u == n)) for n in names}
        uppers = {n: tuple(sorted(u for u, l in u2l_e if l == n)) for n in names}
        self._problems = types.MappingProxyType(by_name)
        self._u2l, self._l2u = u2l_e, l2u_e
        self._order = order
        self._deps = types.MappingProxyType(deps)
        self._lowers = types.MappingProxyType(lowers)
        self._uppers = types.MappingProxyType(uppers)
        self._total_derivative = total_derivative

        # A u2l edge whose lower problem never feeds back (along l2u edges) into the upper
        # problem's loss would change that solution without the upper problem ever seeing it.
        for u, l in u2l_e:
            if l not in self.path_problems(u):
                raise ValueError(
                    f"u2l edge {u!r} -> {l!r}: problem {u!r}'s loss is unreachable from "
                    f"{l!r}'s solution (no l2u path {l!r} -> ... -> {u!r}), so {u!r} "
                    f"would never get a hypergradient through it; add an l2u edge"
                )

        # A best-response Jacobian is needed exactly for the problems on some eq.-2.2 path.
        for n in names:
            for m in sorted(self.path_problems(n)):
                if by_name[m].method is None:
                    raise ValueError(
                        f"problem {m!r} has no hypergradient method but lies on a path from "
                        f"problem {n!r}'s parameters into its loss (thesis eq. 2.2); pass "
                        f"method=jaxmlo.cg() or another method to Problem {m!r}"
                    )

        for p in problems:
            if p.example_batch is not None:
                self.check_loss(p.name, p.example_batch)

    def __setattr__(self, name, value):
        if name in Program.__slots__ and not hasattr(self, name):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError("Program is immutable; build a new one")

    # --- read-only views -------------------------------------------------------------------
    @property
    def problems(self) -> Mapping[str, Problem]:
        """``{name: Problem}`` (read-only)."""
        return self._problems

    @property
    def u2l(self) -> tuple:
        """Upper-to-lower edges as sorted ``(upper, lower)`` pairs."""
        return self._u2l

    @property
    def l2u(self) -> tuple:
        """Lower-to-upper edges as sorted ``(lower, upper)`` pairs."""
        return self._l2u

    @property
    def total_derivative(self) -> str:
        """``"exact"`` or ``"paths"``: see the class docstring."""
        return self._total_derivative

    @property
    def order(self) -> tuple:
        """Problem names in execution order: lowest level first (topological order)."""
        return self._order

    def deps(self, name: str) -> tuple:
        """Names in ``name``'s ``deps`` dict: u2l uppers and l2u lowers."""
        return self._deps[name]

    def lowers(self, name: str) -> tuple:
        """Problems whose solutions enter ``name``'s loss (l2u edges into ``name``)."""
        return self._lowers[name]

    def uppers(self, name: str) -> tuple:
        """Problems whose parameters enter ``name``'s loss (u2l edges into ``name``)."""
        return self._uppers[name]

    def paths(self, upper: str, lower: str) -> tuple:
        """All paths (thesis eq. 2.2) from ``theta_upper`` to ``theta_lower*``.

        Each path is a tuple of lower-problem names ``(q(1), ..., q(m) = lower)``: the first
        step is a u2l edge ``upper -> q(1)``, the rest are l2u edges.
        """
        succ = {}
        for l, u in self._l2u:
            succ.setdefault(l, []).append(u)
        out = []

        def dfs(node, path):
            if node == upper:
                return  # a path back through the upper problem itself is not a best response
            path = path + (node,)
            if node == lower:
                out.append(path)
            for nxt in succ.get(node, ()):
                dfs(nxt, path)

        for u, l in self._u2l:
            if u == upper:
                dfs(l, ())
        return tuple(sorted(out))

    def path_problems(self, upper: str) -> frozenset:
        """Lower problems on some eq.-2.2 path from ``theta_upper`` into ``upper``'s loss."""
        succ, pred = {}, {}
        for l, u in self._l2u:
            succ.setdefault(l, set()).add(u)
            pred.setdefault(u, set()).add(l)
        fwd = {l for u, l in self._u2l if u == upper}
        stack = list(fwd)
        while stack:
            for m in succ.get(stack.pop(), ()):
                if m != upper and m not in fwd:
                    fwd.add(m)
                    stack.append(m)
        bwd = set(self._lowers[upper])
        stack = list(bwd)
        while stack:
            for m in pred.get(stack.pop(), ()):
                if m not in bwd:
                    bwd.add(m)
                    stack.append(m)
        return frozenset(fwd & bwd)

    def check_loss(self, name: str, batch):
        """Traces ``name``'s loss with ``jax.eval_shape``; raises if it asks for a missing dep."""
        p = self._problems[name]
        deps = {d: self._problems[d].params for d in self._deps[name]}
        try:
            out = jax.eval_shape(p.loss, p.params, deps, batch)
        except KeyError as e:
            raise ValueError(
                f"problem {name!r}: its loss asks for dependency {e.args[0]!r} but the graph gives "
                f"it only {list(self._deps[name])}; add a u2l edge {{{e.args[0]!r}: [{name!r}]}} or "
                f"an l2u edge {{{e.args[0]!r}: [{name!r}]}}"
            ) from None
        if getattr(out, "shape", None) != ():
            raise ValueError(
                f"problem {name!r}: loss must return a scalar, got shape "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )

    def __repr__(self):
        return f"Program(order={list(self._order)}, u2l={list(self._u2l)}, l2u={list(self._l2u)})"


def _toposort(names, above):
    """Kahn's algorithm, lowest first; on a cycle names the problems on it."""
    indeg = {n: 0 for n in names}
    for n in names:
        for m in above[n]:
            indeg[m] += 1
    ready = [n for n in names if indeg[n] == 0]
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in sorted(above[n]):
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if len(order) != len(names):
        rest = [n for n in names if n not in order]
        cycle = _find_cycle(rest, above)
        raise ValueError(
            f"the problem graph has a cycle through {cycle}: each problem would be "
            f"both above and below the others (check u2l/l2u directions)"
        )
    return tuple(order)


def _find_cycle(nodes, above):
    # Every node left after Kahn's algorithm has a predecessor among the others, so walking
    # predecessors must close a loop.
    nodes = set(nodes)
    preds = {n: sorted(m for m in nodes if n in above[m]) for n in nodes}
    start = min(nodes)
    path, seen = [start], {start: 0}
    while True:
        nxt = preds[path[-1]][0]
        if nxt in seen:
            return list(reversed(path[seen[nxt] :] + [nxt]))
        seen[nxt] = len(path)
        path.append(nxt)
