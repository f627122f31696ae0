# syntax_missing_arrow.kt: an edge without its `->`
# expect: E100
graph syntax_missing_arrow
data digits { val_split = 300 }
node a : cnn_tiny [target]
label a : through
