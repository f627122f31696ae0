"""`python -m dclang` (also what `torchrun -m dclang` runs)."""

from dclang.cli import main

main(prog_name="dclang")
