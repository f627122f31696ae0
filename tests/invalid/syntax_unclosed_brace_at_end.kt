# syntax_unclosed_brace_at_end.kt: a block still open when the file ends
# expect: E102
graph syntax_unclosed_brace_at_end
node a : cnn_tiny [target]
label -> a : through
train {
  epochs = 8
