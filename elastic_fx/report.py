"""Pictures and tables a person can look at: fitness per generation, the per-block
allocation heatmap (paper Fig. 8: which fraction of each block survives at each budget),
and the budget table, bundled as a Markdown report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .budget import achieved
from ._io import atomic_write
from .scores import ElasticScores

log = logging.getLogger(__name__)

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from e
    return plt


def plot_fitness(history: List[dict], path: Path) -> Path:
    """Best, mean and best-so-far fitness per xNES generation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best"] for h in history], "o-", ms=3, label="best of generation")
    ax.plot(gens, [h["mean"] for h in history], "s-", ms=3, alpha=0.7, label="population mean")
    ax.plot(gens, [h["best_so_far"] for h in history], "k--", lw=1, label="best so far")
    ax.set_xlabel("generation")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("fitness (PCA cosine, mean over sparsities)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def kept_fractions(scores: ElasticScores, smap, sparsities: Sequence[float]) -> Dict[str, List[List[float]]]:
    """Per budget and block: fraction of heads and of neurons kept."""
    heads, neurons = [], []
    for s in sparsities:
        keep = scores.keep(smap, s)
        heads.append([len(keep[b.index].get("heads", [])) / b.attention.num_heads if b.attention else float("nan")
                      for b in smap.blocks])
        neurons.append([
            len(keep[b.index]["neurons"]) / b.mlp.hidden_features if b.mlp and b.mlp.prunable else float("nan")
            for b in smap.blocks
        ])
    return {"heads": heads, "neurons": neurons}


def plot_kept_heatmap(scores: ElasticScores, smap, path: Path, sparsities: Sequence[float] = DEFAULT_SPARSITIES) -> Path:
    """Heatmap of kept fraction per block (columns) and budget (rows), heads and FFN side by side."""
    plt = _pyplot()
    frac = kept_fractions(scores, smap, sparsities)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(sparsities) + 2.2), sharey=True, layout="constrained")
    for ax, key in zip(axes, ("heads", "neurons")):
        im = ax.imshow(frac[key], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"kept fraction of {'attention heads' if key == 'heads' else 'FFN neurons'}")
        ax.set_xlabel("block")
        ax.set_xticks(range(len(smap.blocks)))
        ax.set_yticks(range(len(sparsities)))
        ax.set_yticklabels([f"{s:.0%}" for s in sparsities])
    axes[0].set_ylabel("sparsity")
    fig.colorbar(im, ax=axes, shrink=0.9, label="kept fraction")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def budget_table(scores: ElasticScores, smap, sparsities: Sequence[float], extra: Optional[Dict[float, dict]] = None) -> List[dict]:
    """One row per budget: achieved sparsity, parameters, GFLOPs (and any extra columns)."""
    rows = []
    dense = achieved(smap, {})
    rows.append({"target": 0.0, "sparsity": 0.0, "params_M": dense["params"] / 1e6, "gflops": dense["gflops"],
                 **((extra or {}).get(0.0, {}))})
    for s in sparsities:
        st = achieved(smap, scores.keep(smap, s))
        rows.append({"target": s, "sparsity": st["sparsity"], "params_M": st["params"] / 1e6, "gflops": st["gflops"],
                     **((extra or {}).get(s, {}))})
    return rows


def markdown_table(rows: List[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _space(cfg: dict) -> str:
    dim, share = cfg.get("pca_dim", "?"), cfg.get("pca_error_share")
    where = cfg.get("fitness_used") or ("the full embedding space" if dim is None else f"PCA to {dim} dims")
    held = "" if share is None or share != share else f" ({100 * share:.1f} % of the pruning error inside)"
    return f"{where}{held}, {cfg.get('search_images', '?')} search / {cfg.get('selection_images', '?')} selection images"


def _selection_lines(sel: dict) -> List[str]:
    """How the returned ranking was chosen: search and selection fitness of c = 1 and of the winner."""
    if not sel:
        return ["No search: the local scores rank alone (c = 1).", ""]
    c1, win = sel.get("c1", {}), sel.get("winner", {})
    lines = ["## How the ranking was chosen", "", sel.get("summary", ""), "",
             "| candidate | search fitness | selection fitness |", "|---|---:|---:|",
             f"| c = 1 (no search) | {_fmt(c1.get('search'))} | {_fmt(c1.get('selection'))} |",
             f"| winner: {win.get('name', '-')} | {_fmt(win.get('search'))} | {_fmt(win.get('selection'))} |", ""]
    best = sel.get("best") or {}
    if best.get("gain_interval") and best.get("name") != win.get("name"):
        lo, hi = best["gain_interval"]
        lines += [f"Best other candidate on the selection images: {best['name']} ({_fmt(best.get('selection'))}); "
                  f"its gain over c = 1 has the {100 * best.get('confidence', 0):g} % interval [{lo:+.4f}, {hi:+.4f}], "
                  "which reaches 0, so it was not trusted.", ""]
    if sel.get("chosen") == "c=1":
        lines += ["Nothing the search found beat the no-search ranking on the held-out selection images, "
                  "so the no-search ranking (c = 1) was kept.", ""]
    return lines


def write_report(scores: ElasticScores, smap, out_dir: Path, *, title: str = "elastic_fx report",
                 sparsities: Sequence[float] = DEFAULT_SPARSITIES, extra: Optional[Dict[float, dict]] = None) -> Path:
    """report.md + fitness.png + allocation.png in ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    images = []
    if scores.history:
        plot_fitness(scores.history, out_dir / "fitness.png")
        images.append(("Fitness per generation", "fitness.png"))
    plot_kept_heatmap(scores, smap, out_dir / "allocation.png", sparsities)
    images.append(("Kept fraction per block and budget", "allocation.png"))
    cfg = scores.config
    lines = [
        f"# {title}",
        "",
        f"elastic_fx {scores.version}; local scores: {cfg.get('method', '?')}; "
        f"search: {len(scores.history)} generations, population {cfg.get('popsize', '-')}, "
        f"search sparsities {list(scores.sparsities)}.",
        "",
        f"Ranking: {scores.ranking}; fitness: {_space(cfg)}.",
        "",
    ] + _selection_lines(scores.selection) + [
        "## Budgets",
        "",
        markdown_table(budget_table(scores, smap, sparsities, extra)),
        "",
    ]
    for caption, name in images:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    path = out_dir / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
    return path
