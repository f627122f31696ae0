# syntax_missing_colon.kt: an edge without the `:` before its gate
# expect: E100
graph syntax_missing_colon
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a through
