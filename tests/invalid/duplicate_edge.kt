# duplicate_edge.kt: the same ordered pair twice
# expect: E301
graph duplicate_edge
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : through
label -> a : correct
