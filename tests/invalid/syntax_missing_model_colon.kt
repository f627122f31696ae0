# syntax_missing_model_colon.kt: a node without the `:` before its model
# expect: E100
graph syntax_missing_model_colon
data digits { val_split = 300 }
node a cnn_tiny [target]
label -> a : through
