# syntax_unclosed_brace.kt: a block that is never closed
# expect: E100
graph syntax_unclosed_brace
data digits {
  val_split = 300
node a : cnn_tiny [target]
label -> a : through
