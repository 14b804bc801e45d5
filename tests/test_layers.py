"""The package's layers: which part of ``vitos_verl`` may import which.

Every module of ``vitos_verl/`` is parsed with ``ast`` (nothing is imported or run) and every
``vitos_verl.*`` import in it, at module level or inside a function, becomes an arrow from its
*part* (the folder under ``vitos_verl/``, or the root module's name) to the imported one. The parts
stand in :data:`LAYERS`, bottom first; an arrow may only point to a lower layer, so no two parts
import each other, however indirectly. What an arrow may not do beyond that, and the few arrows
that are let through, are listed here with their reasons.

To see the same graph by hand, ``grep -rn "vitos_verl\\." vitos_verl --include=*.py | grep import``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vitos_verl"

#: The layers, bottom first. A part may import its own modules and any part of a lower layer;
#: parts that share a layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the upstream hooks, one module per pinned upstream (verl, vLLM, transformers, torch)
    ("compat",),
    # foundations: names shared across the layers, atomic file writes, platform plugins,
    # checkpoint export; none of them imports another part
    ("vitos_verl", "records", "atomic", "platform", "export"),
    # the cell geometry, keep masks, box parsing and the box-to-mask plan (no verl, vLLM, Ray)
    ("pruning",),
    # the rewards of both streams (score the plan's boxes)
    ("rewards",),
    # verl's dataset, prompts, SFT export; the tiny test model
    ("data", "models"),
    # worker side: vLLM model and plugin, agent loop, actor patch
    ("rollout",),
    # the driver (the trainer) and the tools (evaluation, reports): the top, side by side
    ("trainer", "eval"),
)

#: Arrows that break no layer but that only the named modules may draw: the trainer is the driver
#: and reaches the worker side (rollout/) only where it wires the workers up.
ONLY_FROM: dict[tuple[str, str], dict[str, str]] = {
    ("trainer", "rollout"): {
        "vitos_verl.trainer.main": "registers the ViToS actor worker, whose init_model applies the actor patch "
        "(vitos_verl.rollout.actor_patch) inside each Ray worker",
    },
}

#: Arrows let through against :data:`LAYERS`: ``(importer module, imported module) -> reason``.
#: Empty: every arrow of the package follows the layers.
EXCEPTIONS: dict[tuple[str, str], str] = {}

#: Modules that must stay importable without verl, vLLM, Ray, PIL or transformers of their own
#: (the box-to-mask step: the trainer, the reward, the evaluation and the dumps share it), and the
#: top-level packages each may import at run time (``if TYPE_CHECKING:`` imports aside).
PURE: dict[str, set[str]] = {
    "vitos_verl.pruning.plan": {"__future__", "collections", "dataclasses", "math", "typing", "numpy", "torch", "vitos_verl"},
    "vitos_verl.pruning.boxes": {"__future__", "collections", "json", "math", "re"},
    "vitos_verl.records": set(),
}


@dataclass(frozen=True)
class Arrow:
    importer: str  # module that imports
    imported: str  # module (or package) imported
    line: int
    type_checking: bool = False

    @property
    def where(self) -> str:
        return f"{self.importer.replace('.', '/')}.py:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    """``vitos_verl.trainer.config`` -> ``trainer``; ``vitos_verl.records`` -> ``records``; ``vitos_verl`` -> itself."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(path: Path) -> list[Arrow]:
    """Every import of ``path`` (module level, in functions and classes), absolute names."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importer's package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # "from vitos_verl.pruning import plan" names a submodule: the arrow goes to it
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out += [Arrow(module, n, node.lineno, node.lineno in guarded) for n in dict.fromkeys(names)]
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_arrows() -> list[Arrow]:
    arrows = [a for p in sorted(PACKAGE.rglob("*.py")) for a in imports(p)]
    return [a for a in arrows if a.imported == "vitos_verl" or a.imported.startswith("vitos_verl.")]


def tier() -> dict[str, int]:
    return {part: i for i, layer in enumerate(LAYERS) for part in layer}


def test_every_part_has_a_layer():
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    missing = sorted(parts - set(tier()))
    assert not missing, f"parts of vitos_verl in no layer: {missing}; place them in LAYERS"
    listed = [p for layer in LAYERS for p in layer]
    assert len(listed) == len(set(listed)), "a part stands in two layers"


def test_no_arrow_runs_up_or_sideways():
    level = tier()
    bad = []
    for a in package_arrows():
        src, dst = part_of(a.importer), part_of(a.imported)
        if src == dst or (a.importer, a.imported) in EXCEPTIONS:
            continue
        if level[dst] >= level[src]:
            way = "sideways" if level[dst] == level[src] else "up"
            bad.append(f"{a.where}: {a.importer} imports {a.imported} ({src} -> {dst} runs {way})")
    assert not bad, "imports against the layers (see LAYERS):\n" + "\n".join(bad)


def test_narrow_arrows_come_only_from_their_modules():
    bad = []
    for a in package_arrows():
        allowed = ONLY_FROM.get((part_of(a.importer), part_of(a.imported)))
        if allowed is not None and a.importer not in allowed:
            bad.append(f"{a.where}: {a.importer} imports {a.imported}; only {sorted(allowed)} may")
    assert not bad, "\n".join(bad)


def test_exceptions_are_still_needed():
    arrows = package_arrows()
    stale = sorted(set(EXCEPTIONS) - {(a.importer, a.imported) for a in arrows})
    assert not stale, f"exceptions for imports that are gone: {stale}; remove them"
    for (_, dst), allowed in ONLY_FROM.items():
        for module in allowed:
            assert any(a.importer == module and part_of(a.imported) == dst for a in arrows), (
                f"{module} no longer imports {dst}; remove it from ONLY_FROM"
            )


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for a in package_arrows():
        src, dst = part_of(a.importer), part_of(a.imported)
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("cycle between parts: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_pure_modules_import_only_what_they_may():
    for module, allowed in PURE.items():
        path = ROOT.joinpath(*module.split("."))
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        taken = {a.imported.split(".")[0] for a in imports(path) if not a.type_checking}
        assert taken <= allowed, f"{module} imports {sorted(taken - allowed)} (allowed: {sorted(allowed)})"
        inside = {a.imported for a in imports(path) if a.imported.startswith("vitos_verl")}
        lower = {m for m in inside if part_of(m) not in ("pruning",)}
        assert not lower, f"{module} imports {sorted(lower)}: a pure module uses only vitos_verl.pruning"


def test_the_reader_sees_function_level_imports():
    """The graph counts imports inside functions and relative imports, not only module-level ones."""
    src = PACKAGE / "eval" / "runner.py"
    arrows = {a.imported for a in imports(src)}
    assert "vitos_verl.rollout.vllm_plugin" in arrows  # imported inside Evaluator.llm
    assert "vitos_verl.data.dataset" in arrows  # imported inside Evaluator.__init__
