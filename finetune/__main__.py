"""`python -m finetune`: the `finetune` command."""

from .cli import run

run()
