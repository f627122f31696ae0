"""The `.kt` surface syntax: parse text to an AST and print an AST back as canonical text."""
