# self_edge.kt: a node cannot teach itself
# expect: E303
graph self_edge
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : through
a     -> a : through
