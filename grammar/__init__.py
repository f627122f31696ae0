"""The dclang grammar, packed into the wheel as the `dclang.grammar` resource package."""
