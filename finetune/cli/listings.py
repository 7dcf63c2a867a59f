"""`finetune recipes`, `finetune models` and `finetune cache`: what the toolkit offers and keeps."""

from __future__ import annotations

import argparse

from rich.table import Table

from .. import arguments as check
from ..errors import UsageError


def add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the built-in recipes, or show the fields of one")
    p.set_defaults(handler=cmd_recipes)
    p.add_argument("name", nargs="?", help="a recipe name (or a .toml recipe file)")


def cmd_recipes(args: argparse.Namespace) -> int:
    from .. import recipes
    from . import out

    if args.name:
        recipe = check.recipe("NAME", args.name)
        text = (f"# recipe {recipe.name}: the fields that act on this recipe's training path\n"
                + recipe.to_toml())
        out.print(text, markup=False, highlight=False, soft_wrap=True, end="")
        return 0
    table = Table(title="built-in recipes (finetune recipes NAME shows one in full)")
    for column in ("name", "backbone", "head", "training", "description"):
        table.add_column(column, no_wrap=column == "name")
    for name in recipes.names():
        r = recipes.get(name)
        table.add_row(name, _backbone_training(r), r.head, _schedule(r), r.description)
    out.print(table)
    return 0


def _backbone_training(r) -> str:
    trains = {0: "frozen", -1: "all unfrozen"}.get(r.unfreeze_stages, f"top {r.unfreeze_stages} stages")
    if r.trains_backbone:
        trains += f" after {r.freeze_epochs} epoch(s)"
    return trains


def _schedule(r) -> str:
    if r.cached_features and not r.trains_backbone:
        return "probe (L-BFGS on cached features)"
    if r.cached_features and r.freeze_epochs:
        return f"probe, then {r.epochs - r.freeze_epochs} epochs"
    return f"{r.epochs} epochs"


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list backbones whose pretrained weights work offline")
    p.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from ..model.backbones import list_offline_backbones
    from . import out

    table = Table(title="backbones with offline ImageNet weights")
    for column in ("name", "params (M)", "input", "source", "available"):
        table.add_column(column, no_wrap=column == "name")
    for row in list_offline_backbones():
        size = "x".join(str(v) for v in row["input_size"][1:])
        table.add_row(row["name"], f"{row['params']:.1f}", size, row["source"], "yes" if row["available"] else "no")
    out.print(table)
    out.print("Any other timm name works with its own pretrained weights when reachable, "
              "with --weights FILE, or with --no-pretrained.")
    return 0


def add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or clear the caches finetune keeps (weights, doctor checks, decoded "
                                     "images, frozen-part activations)")
    p.set_defaults(handler=cmd_cache)
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("kinds", nargs="*", metavar="KIND", help="clear only these: weights, doctor, decoded, "
                                                            "activations (default: every cache)")


def cmd_cache(args: argparse.Namespace) -> int:
    from .. import caches
    from ..files import cache_dir
    from ..output_space import human_bytes
    from . import out

    unknown = [k for k in args.kinds if k not in caches.KINDS]
    if unknown:
        raise UsageError(f"KIND {unknown[0]}: no such cache; choose from {', '.join(caches.KINDS)}")
    kinds = args.kinds or list(caches.KINDS)
    if args.action == "clear":
        freed = caches.clear(kinds)
        out.print(f"cleared {', '.join(kinds)} in {cache_dir()}: {human_bytes(freed)} freed")
        return 0
    table = Table(title=f"caches in {cache_dir()} ($FINETUNE_CACHE); `finetune cache clear [KIND]` empties them")
    for column in ("cache", "what", "entries", "size", "budget"):
        table.add_column(column, justify="right" if column in ("entries", "size", "budget") else "left")
    for name in kinds:
        kind, found = caches.KINDS[name], caches.entries(name)
        budget = "none" if kind.budget_bytes is None else human_bytes(kind.budget_bytes)
        table.add_row(name, kind.what, str(len(found)), human_bytes(sum(e.bytes for e in found)), budget)
    out.print(table)
    return 0
