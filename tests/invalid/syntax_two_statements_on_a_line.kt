# syntax_two_statements_on_a_line.kt: declarations end at the end of a line
# expect: E100
graph syntax_two_statements_on_a_line
data digits { val_split = 300 }
node a : cnn_tiny [target] label -> a : through
